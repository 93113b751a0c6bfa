/* check: kp_broker_check(), the broker's invariants written down as code.
 *
 * Walks every structure and cross-checks the redundant counts and links the
 * hot paths maintain incrementally: a worker's in_flight is the number of
 * calls on its list, a service's queued/in_flight match its queue and the
 * calls held for it, its flows (one per client with queued calls) hold
 * exactly its queued calls, every client map entry names a live call of that
 * client, ORPHANED calls are counted, deadlines are armed exactly while a
 * client (or intake producer) still waits, a service's method sets are its
 * workers' own and its `uniform` flag is true exactly when they are all
 * equal. The in-process tests and the
 * broker fuzzer (tests/fuzz/fuzz_broker.c) call it after every step.
 */
#include <string.h>

#include "broker_impl.h"

static const char *check_call(const struct kp_broker *b, const struct kp_call *c)
{
    if (kp_idmap_get(&b->calls.by_serial, c->serial) != c)
        return "a call is not in the call table under its serial";
    bool waiting = c->state != KP_CALL_ORPHANED;
    bool stopped = b->state == KP_BROKER_STOPPED; /* clients were all answered */
    if (!stopped && kp_timer_armed(&c->timer) != (waiting && c->deadline != 0))
        return "a call's timer is armed iff someone waits on it and it has a deadline";
    if (c->client) {
        if (!waiting)
            return "an ORPHANED call still has a client";
        if (kp_idmap_get(&c->client->calls, c->client_request_id) != c)
            return "a call's client does not map its request_id to it";
    }
    if ((c->state == KP_CALL_QUEUED) == (c->worker != NULL))
        return "a call has a worker iff it is not QUEUED";
    if (c->state == KP_CALL_QUEUED && (kp_list_empty(&c->queue_link) || c->flow == NULL))
        return "a QUEUED call is in no queue";
    if (c->state != KP_CALL_QUEUED && c->flow != NULL)
        return "a dispatched call still names a flow";
    if (c->state != KP_CALL_QUEUED && !kp_list_empty(&c->queue_link))
        return "a dispatched call is still in a queue";
    if (c->service == NULL)
        return "a call has no service";
    if ((c->flags & KP_FLAG_IDEMPOTENT) && waiting && !c->has_header)
        return "an idempotent call lost the header it needs to be sent again";
    return NULL;
}

/* A service's queue (service.h): every flow in the ring holds calls, is
 * found under its key, and holds only QUEUED calls of s that point back at
 * it and come from the client (or intake) the key names; the counts add up. */
static const char *check_queue(const struct kp_broker *b, const struct kp_service *s)
{
    size_t queued = 0, flows = 0;
    bool stopped = b->state == KP_BROKER_STOPPED; /* clients were detached */
    for (const struct kp_list *fl = s->ring.next; fl != &s->ring; fl = fl->next) {
        const struct kp_flow *f = kp_container_of(fl, struct kp_flow, ring_link);
        if (kp_idmap_get(&s->flows, f->key) != f)
            return "a flow in a service's ring is not in its flow map under its key";
        if (f->queued == 0 || kp_list_empty(&f->calls))
            return "an empty flow is still in a service's ring";
        size_t n = 0;
        for (const struct kp_list *l = f->calls.next; l != &f->calls; l = l->next) {
            const struct kp_call *c = kp_container_of(l, struct kp_call, queue_link);
            if (c->service != s || c->state != KP_CALL_QUEUED || c->flow != f)
                return "a service queue holds a call that is not its QUEUED call";
            uint64_t key = c->client ? c->client->serial : KP_FLOW_INTAKE;
            if (key != f->key && !(stopped && c->client == NULL))
                return "a queued call is in another client's flow";
            n++;
        }
        if (n != f->queued)
            return "a flow's queued count differs from its calls";
        queued += n;
        flows++;
    }
    if (flows != s->nflows || kp_idmap_count(&s->flows) != flows)
        return "a service's flow count differs from its ring or its flow map";
    if (queued != s->queued)
        return "a service's queued count differs from its queue";
    return NULL;
}

const char *kp_broker_check(const struct kp_broker *b)
{
    size_t pos = 0, orphans = 0;
    struct kp_call *c;
    while ((c = kp_idmap_next(&b->calls.by_serial, &pos, NULL)) != NULL) {
        const char *why = check_call(b, c);
        if (why)
            return why;
        orphans += c->state == KP_CALL_ORPHANED;
    }
    if (orphans != b->orphans)
        return "the ORPHANED count is wrong";

    pos = 0;
    struct kp_worker *w;
    while ((w = kp_bmap_next(&b->workers.by_rid, &pos)) != NULL) {
        size_t held = 0;
        for (struct kp_list *l = w->calls.next; l != &w->calls; l = l->next) {
            c = kp_container_of(l, struct kp_call, worker_link);
            if (c->worker != w || c->state == KP_CALL_QUEUED)
                return "a worker's call list holds a call that is not its own";
            held++;
        }
        if (held != w->in_flight)
            return "a worker's in_flight differs from the calls it holds";
        if (w->credits > KP_WORKER_MAX_CREDITS)
            return "a worker has more credits than allowed";
        for (size_t i = 0; i < w->nservices; i++) {
            const struct kp_service *s = w->services[i];
            size_t k = 0;
            while (k < s->nworkers && s->workers[k] != w)
                k++;
            if (k == s->nworkers)
                return "a worker's service does not list the worker";
            if (s->wmethods[k] != w->methods[i])
                return "a service holds another method set for a worker than the worker's own";
            const struct kp_methods *m = w->methods[i];
            for (size_t j = 1; m && j < m->n; j++) {
                if (strcmp(m->names[j - 1], m->names[j]) >= 0)
                    return "a method set is not sorted and unique";
            }
            if (m && m->n == 0)
                return "an empty method set (it would serve nothing; NULL means all)";
        }
    }

    pos = 0;
    struct kp_service *s;
    while ((s = kp_services_next(&b->services, &pos)) != NULL) {
        const char *why = check_queue(b, s);
        if (why)
            return why;
        for (size_t i = 0; i < s->nworkers; i++) {
            if (kp_workers_find(&b->workers, s->workers[i]->rid.bytes, s->workers[i]->rid.len) !=
                s->workers[i])
                return "a service lists a worker that is not registered";
        }
        bool uniform = true;
        for (size_t i = 1; i < s->nworkers; i++)
            uniform = uniform && kp_methods_equal(s->wmethods[0], s->wmethods[i]);
        if (uniform != s->uniform)
            return "a service's uniform flag does not match its workers' method sets";
        if (b->grace_ended && !s->served && s->queued > 0)
            return "a call waits for a service nobody registered after the start-up grace";
        size_t in_flight = 0;
        size_t cpos = 0;
        while ((c = kp_idmap_next(&b->calls.by_serial, &cpos, NULL)) != NULL)
            in_flight += c->service == s && c->worker != NULL;
        if (in_flight != s->in_flight)
            return "a service's in_flight differs from its calls held by workers";
        if (s->pending && b->state != KP_BROKER_STOPPED && kp_list_empty(&s->pending_link))
            return "a pending service is not on the pending list";
    }

    pos = 0;
    struct kp_client *cl;
    while ((cl = kp_bmap_next(&b->clients.by_rid, &pos)) != NULL) {
        size_t rpos = 0;
        uint64_t id;
        while ((c = kp_idmap_next(&cl->calls, &rpos, &id)) != NULL) {
            if (kp_idmap_get(&b->calls.by_serial, c->serial) != c)
                return "a client maps a request_id to a call that is not live";
            if (c->client != cl || c->client_request_id != id)
                return "a client maps a request_id to another client's call";
        }
        if (kp_idmap_count(&cl->calls) > b->client_max_inflight)
            return "a client has more calls than --client-max-inflight";
    }
    if (b->state != KP_BROKER_STOPPED &&
        (!kp_list_empty(&b->pending) || !kp_list_empty(&b->gone_workers) ||
         !kp_list_empty(&b->gone_clients)))
        return "work was left for the next iteration after before-sleep";
    return kp_jobs_check(b);
}

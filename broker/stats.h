/* stats: the broker's counters, and a small JSON writer for the Stats call.
 *
 * Every drop, refusal and notable event increments one counter of
 * KP_COUNTERS; the list generates the struct and the JSON, so a new counter is
 * one line. Counters are plain uint64_t owned by the single loop thread (no
 * atomics needed). kelpie.broker/Stats returns them, flat, beside gauges and
 * per-service figures (see docs/operations.md for the meaning of each).
 */
#ifndef KP_STATS_H
#define KP_STATS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KP_COUNTERS(XX)                                                                            \
    XX(requests)                  /* REQUESTs accepted from clients */                             \
    XX(intake_requests)           /* REQUESTs accepted from the intake */                          \
    XX(dispatched)                /* REQUESTs sent to workers (incl. re-sends) */                  \
    XX(replies)                   /* REPLYs forwarded to clients */                                \
    XX(chunks)                    /* CHUNKs forwarded to clients */                                \
    XX(ends)                      /* ENDs forwarded to clients */                                  \
    XX(errors_forwarded)          /* worker ERRORs forwarded to clients */                         \
    XX(errors_sent)               /* ERRORs the broker itself sent */                              \
    XX(bad_frames)                /* no header frame / too many frames */                          \
    XX(bad_header)                /* header did not decode */                                      \
    XX(oversized)                 /* header or message over the limit */                           \
    XX(bad_version)               /* version != 1 */                                               \
    XX(bad_kind)                  /* unknown kind or kind not allowed here */                      \
    XX(bad_request)               /* request_id already outstanding */                             \
    XX(not_ready)                 /* worker traffic before READY */                                \
    XX(unimplemented)             /* job kinds (not served in 0.1) */                              \
    XX(replies_dropped_unknown)   /* answer for an unknown id, wrong worker or a JOB dispatch */   \
    XX(replies_dropped_cancelled) /* answer for a cancelled or timed-out call */                   \
    XX(oneway_answers)            /* answers to intake requests, discarded */                      \
    XX(unroutable)                /* NOT_FOUND: no worker ever registered the service */           \
    XX(queue_full)                /* service queue full */                                         \
    XX(client_limit)              /* client in-flight limit reached */                             \
    XX(not_reading)               /* REQUESTs refused: the client's queued bytes over the limit */ \
    XX(answers_replaced)          /* answers replaced by ERROR: the client is not reading */       \
    XX(answers_oversized)         /* worker ERRORs flagged OVERSIZED (answer over the limit) */    \
    XX(worker_not_reading)        /* dispatches held back: the worker's queued bytes over limit */ \
    XX(deadline_expired_queued)   /* deadline passed before dispatch */                            \
    XX(deadline_expired_inflight) /* deadline passed while a worker had it */                      \
    XX(cancelled)                 /* CANCELs that ended a call */                                  \
    XX(cancel_unknown)            /* CANCEL/CREDIT for no outstanding call */                      \
    XX(credits_forwarded)         /* stream CREDITs forwarded to workers */                        \
    XX(input_chunks)              /* client CHUNKs/ENDs of CLIENT_STREAM calls accepted */         \
    XX(input_credits)             /* input-window CREDITs forwarded from workers to clients */     \
    XX(input_dropped)             /* client input or input CREDIT for no live call */              \
    XX(input_overrun)             /* calls failed: input past the window, after END, or unasked */ \
    XX(input_batches)             /* client CHUNKs with the BATCH flag accepted (§5.8) */         \
    XX(input_batch_refused)       /* calls failed: a BATCH CHUNK malformed or over KP_MAX_BATCH */ \
    XX(workers_registered)        /* READYs from new workers */                                    \
    XX(worker_disconnects)        /* DISCONNECTs from workers */                                   \
    XX(worker_expired)            /* workers removed for silence */                                \
    XX(loop_stalls)               /* the loop itself stalled: its peers' silence then forgiven */  \
    XX(worker_lost)               /* calls failed UNAVAILABLE because their worker left */         \
    XX(redispatched)              /* idempotent calls re-queued after worker loss */               \
    XX(client_disconnects)        /* DISCONNECTs from clients */                                   \
    XX(client_gone)               /* clients found unreachable on send */                          \
    XX(intake_dropped)            /* intake messages dropped (malformed or refused) */             \
    XX(errors_dropped)            /* incoming ERRORs that could not be used */                     \
    XX(send_unreachable)          /* sends that failed EHOSTUNREACH */                             \
    XX(send_failed)               /* sends that failed otherwise (HWM) */                          \
    XX(heartbeats_sent)           /* HEARTBEATs sent */                                            \
    XX(heartbeats_received)       /* HEARTBEATs received */                                        \
    XX(broker_calls)              /* calls to kelpie.broker */                                     \
    XX(broker_calls_invalid)      /* kelpie.broker job calls refused: bad metadata */              \
    XX(shutdown_rejected)         /* REQUESTs refused while shutting down */                       \
    XX(auth_accepted)             /* CURVE handshakes ZAP accepted */                              \
    XX(auth_denied_unknown)       /* handshakes refused: key on no allow-list of that socket */    \
    XX(auth_denied_role)          /* handshakes refused: key allowed in another role only */       \
    XX(auth_denied_removed)       /* messages refused: the key left its allow-list (reload) */     \
    XX(auth_denied_admin)         /* admin-only kelpie.broker calls from a non-admin key */        \
    XX(auth_denied_service)       /* READYs refused: a service the worker key may not serve */     \
    XX(auth_handshake_failed) /* handshakes failed before ZAP (plain text, wrong server key) */    \
    XX(auth_reloads)          /* allow-lists reloaded on SIGHUP */                                 \
    XX(auth_reload_failed)    /* reloads refused (bad file): the old lists stay */                 \
    XX(jobs_submitted)        /* SUBMITs taken to the store (frontend and intake) */               \
    XX(intake_submits)        /* ... of which from the intake */                                   \
    XX(jobs_accepted)         /* new jobs committed (ACCEPTED) */                                  \
    XX(jobs_deduplicated)     /* SUBMITs whose idempotency key named an existing job */            \
    XX(jobs_submit_failed)    /* SUBMITs the store refused (disk full, I/O) */                     \
    XX(jobs_claimed)          /* jobs leased from the store */                                     \
    XX(jobs_leased_at_insert) /* ... of which inserted already leased (PostgreSQL, idle queue) */  \
    XX(jobs_dispatched)       /* JOBs sent to workers */                                           \
    XX(jobs_succeeded)        /* jobs finished SUCCEEDED */                                        \
    XX(jobs_failed)           /* attempts the handler failed */                                    \
    XX(jobs_retried)          /* attempts ended with the job queued again */                       \
    XX(jobs_dead)             /* jobs moved to the dead-letter queue */                            \
    XX(jobs_cancelled)        /* jobs or attempts cancelled */                                     \
    XX(jobs_worker_lost)      /* attempts ended because their worker was lost */                   \
    XX(jobs_timeout)          /* attempts that ran past their time limit */                        \
    XX(jobs_rejected)         /* attempts given back with NACK */                                  \
    XX(jobs_results_late)     /* successes taken after their attempt was ended */                  \
    XX(jobs_results_stale)    /* resent or stale RESULT/NACKs (ACKed, nothing changed) */          \
    XX(jobs_rate_limited)     /* claims held back by a queue's rate limit */                       \
    XX(jobs_recovered)        /* jobs found leased when the store opened */                        \
    XX(jobs_notes)            /* notifications from brokers sharing the store (LISTEN) */          \
    XX(jobs_limited_global)   /* claims cut short by a queue's limit shared across brokers */      \
    XX(jobs_store_errors)     /* store requests that failed or could not be made */                \
    XX(jobs_store_stalled)    /* SUBMITs refused while the store answered nothing (stalled) */     \
    XX(job_events)            /* PROGRESS/OUTPUT/notices recorded for watchers */                  \
    XX(job_events_dropped)    /* old events dropped from a job's bounded buffer */                 \
    XX(job_watches)           /* WATCHes accepted */                                               \
    XX(job_watchers_dropped)  /* watchers dropped: gone or not reading */                          \
    XX(job_inputs)            /* INPUTs forwarded to the worker running their job */               \
    XX(job_inputs_refused) /* INPUTs refused: no such job, not running, malformed, worker full */  \
    XX(job_inputs_paced) /* ... of which: past the job's input window (its handler not reading) */ \
    XX(job_input_credits)  /* input window CREDITs from workers for their jobs (§11.7) */         \
    XX(workers_drained)    /* workers that asked to drain */                                       \
    XX(job_events_relayed) /* events of jobs run here sent to brokers whose clients watch them */  \
    XX(job_events_relay_dropped)   /* ... not sent: the relay's outbox was full */                 \
    XX(job_events_relay_coalesced) /* ... PROGRESS replaced by a newer one still unsent */         \
    XX(job_events_remote)          /* events of jobs run elsewhere given to watchers here */       \
    XX(job_events_remote_lost)     /* ... seen missing (a gap in its sequence, a lost part) */     \
    XX(job_inputs_relayed)         /* INPUTs for jobs run by another broker, ACKed by it */        \
    XX(job_cancels_relayed)       /* CancelJobs for jobs run by another broker, passed on by it */ \
    XX(job_relay_timeouts)        /* relayed INPUT/CancelJob that no broker answered in time */    \
    XX(job_relay_unknown_version) /* relay texts of a version not spoken here, dropped */          \
    XX(log_suppressed)            /* warning/error lines held back by the log's rate limit */

struct kp_stats {
#define XX(name) uint64_t name;
    KP_COUNTERS(XX)
#undef XX
};

#define KP_JSON_DEPTH 8

/* A growable JSON text with automatic commas. */
struct kp_json {
    char *data;                    /* NUL-terminated text */
    size_t len;                    /* bytes used, excluding the NUL */
    size_t cap;                    /* bytes allocated */
    int depth;                     /* open objects */
    bool first[KP_JSON_DEPTH + 1]; /* next member at this depth is the first */
};

/* Sets up an empty text. */
void kp_json_init(struct kp_json *j);

/* Frees the text. */
void kp_json_fini(struct kp_json *j);

/* Opens an object: as a member named key, or the top-level value if key is NULL. */
void kp_json_object_begin(struct kp_json *j, const char *key);

/* Closes the innermost object. */
void kp_json_object_end(struct kp_json *j);

/* Adds a member "key": value. */
void kp_json_u64(struct kp_json *j, const char *key, uint64_t value);

/* Adds a member "key": "value" (value escaped as JSON). */
void kp_json_str(struct kp_json *j, const char *key, const char *value);

/* Opens an array: as a member named key, or an element (key NULL). Elements
 * are added with key NULL. */
void kp_json_array_begin(struct kp_json *j, const char *key);

/* Closes the innermost array. */
void kp_json_array_end(struct kp_json *j);

/* Adds a member "key": null. */
void kp_json_null(struct kp_json *j, const char *key);

/* Adds every counter of s as members of the current object. */
void kp_stats_json(const struct kp_stats *s, struct kp_json *j);

#endif

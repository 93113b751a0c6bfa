/*
 * queue.c: kp_queue, the intrusive FIFO of a socket's waiters (contract in
 * queue.h). Plain C: it calls nothing and is called by op.c, which owns
 * what is linked, and read (head, len) by socket.c and loop.c.
 */
#include "queue.h"

void kp_queue_push(kp_queue *q, kp_waiter *w, int front)
{
    w->queue = q;
    if (front) {
        w->prev = NULL;
        w->next = q->head;
        if (q->head != NULL) {
            q->head->prev = w;
        } else {
            q->tail = w;
        }
        q->head = w;
    } else {
        w->next = NULL;
        w->prev = q->tail;
        if (q->tail != NULL) {
            q->tail->next = w;
        } else {
            q->head = w;
        }
        q->tail = w;
    }
    q->len++;
}

void kp_queue_unlink(kp_waiter *w)
{
    kp_queue *q = w->queue;
    if (w->prev != NULL) {
        w->prev->next = w->next;
    } else {
        q->head = w->next;
    }
    if (w->next != NULL) {
        w->next->prev = w->prev;
    } else {
        q->tail = w->prev;
    }
    w->prev = w->next = NULL;
    w->queue = NULL;
    q->len--;
}

kp_waiter *kp_queue_pop(kp_queue *q)
{
    kp_waiter *w = q->head;
    if (w != NULL) {
        kp_queue_unlink(w);
    }
    return w;
}

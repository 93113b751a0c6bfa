/*
 * queue.h: kp_queue, the FIFO a socket's waiters wait in.
 *
 * Plain C, no Python: an intrusive doubly linked list of kp_waiter links
 * that the waiting objects embed (an Operation embeds one, op.c), so
 * queueing allocates nothing and leaving from the middle (a cancelled wait,
 * an expired timer) is O(1). The queue knows nothing of what it links: it
 * neither owns nor counts references; whoever pushes a link keeps its
 * object alive until the link leaves (op.c takes a reference per push).
 * Every socket owns two: receivers waiting for POLLIN and senders waiting
 * for POLLOUT (kp_socket.recv_q, send_q in kp.h).
 */
#ifndef KP_QUEUE_H
#define KP_QUEUE_H

#include <stddef.h>
#include <sys/types.h>

typedef struct kp_queue kp_queue;

/* The link a waiting object embeds. Zeroed (or unlinked), it is in no
 * queue: `queue` is NULL. */
typedef struct kp_waiter {
    struct kp_waiter *prev; /* toward the head, NULL at the head */
    struct kp_waiter *next; /* toward the tail, NULL at the tail */
    kp_queue *queue;        /* the queue it is in, NULL if none */
} kp_waiter;

struct kp_queue {
    kp_waiter *head; /* the first waiter, the next one woken */
    kp_waiter *tail;
    ssize_t len; /* links in the queue */
};

/* Links `w`, which must be in no queue, at the tail of `q`, or at its head
 * when `front` (a waiter whose wake-up was used by somebody else keeps its
 * place). Cannot fail. */
void kp_queue_push(kp_queue *q, kp_waiter *w, int front);

/* Unlinks `w` from the queue it is in; `w` must be in one. Cannot fail. */
void kp_queue_unlink(kp_waiter *w);

/* Unlinks and returns the head of `q`, or NULL if `q` is empty. */
kp_waiter *kp_queue_pop(kp_queue *q);

#endif /* KP_QUEUE_H */

/* list: intrusive circular doubly-linked lists (header only).
 *
 * The owner embeds a struct kp_list; membership costs no allocation and
 * removal is O(1) given the element, which is what queues that must drop a
 * cancelled call from their middle need. An element is in at most one list
 * per embedded link; an unlinked link points to itself.
 */
#ifndef KP_LIST_H
#define KP_LIST_H

#include <stdbool.h>
#include <stddef.h>

struct kp_list {
    struct kp_list *prev; /* previous element, or the head */
    struct kp_list *next; /* next element, or the head */
};

#define kp_container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* Makes l an empty list (or an unlinked element). */
static inline void kp_list_init(struct kp_list *l)
{
    l->prev = l->next = l;
}

/* Returns true if the list is empty (or the element is unlinked). */
static inline bool kp_list_empty(const struct kp_list *l)
{
    return l->next == l;
}

/* Inserts e before `at` (at the tail when at is the head). */
static inline void kp_list_insert_before(struct kp_list *at, struct kp_list *e)
{
    e->prev = at->prev;
    e->next = at;
    at->prev->next = e;
    at->prev = e;
}

/* Appends e at the tail of head. */
static inline void kp_list_push_back(struct kp_list *head, struct kp_list *e)
{
    kp_list_insert_before(head, e);
}

/* Inserts e at the front of head. */
static inline void kp_list_push_front(struct kp_list *head, struct kp_list *e)
{
    kp_list_insert_before(head->next, e);
}

/* Unlinks e from whatever list holds it; a no-op if unlinked. */
static inline void kp_list_remove(struct kp_list *e)
{
    e->prev->next = e->next;
    e->next->prev = e->prev;
    kp_list_init(e);
}

#endif

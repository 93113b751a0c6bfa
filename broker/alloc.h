/* alloc: the daemon's one out-of-memory policy.
 *
 * kelpied cannot do anything useful without memory, and half-handling
 * allocation failures on every path would leave states nobody tests. So every
 * allocation in the broker goes through these wrappers, which log a line and
 * abort() when the allocator fails. Callers never check for NULL.
 */
#ifndef KP_ALLOC_H
#define KP_ALLOC_H

#include <stddef.h>

/* Returns n bytes; never NULL (aborts on failure). */
void *kp_malloc(size_t n);

/* Returns n zeroed objects of size sz; never NULL (aborts on failure or overflow). */
void *kp_calloc(size_t n, size_t sz);

/* Resizes p to n bytes; never NULL (aborts on failure). */
void *kp_realloc(void *p, size_t n);

/* Returns a heap copy of s; never NULL. */
char *kp_strdup(const char *s);

/* Frees p (NULL is fine). */
void kp_free(void *p);

#endif

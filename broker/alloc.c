/* alloc: abort-on-OOM wrappers; see alloc.h for the policy. */
#include "alloc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void alloc_die(size_t n)
{
    fprintf(stderr, "kelpied: out of memory allocating %zu bytes, aborting\n", n);
    abort();
}

void *kp_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        alloc_die(n);
    return p;
}

void *kp_calloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (p == NULL)
        alloc_die(n * sz);
    return p;
}

void *kp_realloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        alloc_die(n);
    return q;
}

char *kp_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = kp_malloc(n);
    memcpy(p, s, n);
    return p;
}

void kp_free(void *p)
{
    free(p);
}

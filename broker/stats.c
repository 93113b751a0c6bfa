/* stats: counter list and JSON writer; see stats.h. */
#include "stats.h"

#include <stdio.h>
#include <string.h>

#include "alloc.h"

static void json_reserve(struct kp_json *j, size_t more)
{
    if (j->len + more + 1 <= j->cap)
        return;
    size_t cap = j->cap ? j->cap : 256;
    while (cap < j->len + more + 1)
        cap *= 2;
    j->data = kp_realloc(j->data, cap);
    j->cap = cap;
}

static void json_raw(struct kp_json *j, const char *s, size_t n)
{
    json_reserve(j, n);
    memcpy(j->data + j->len, s, n);
    j->len += n;
    j->data[j->len] = '\0';
}

static void json_escaped(struct kp_json *j, const char *s)
{
    json_raw(j, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            json_raw(j, esc, 2);
        } else if (*p < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", *p);
            json_raw(j, esc, 6);
        } else {
            json_raw(j, (const char *)p, 1);
        }
    }
    json_raw(j, "\"", 1);
}

static void json_member(struct kp_json *j, const char *key)
{
    if (!j->first[j->depth])
        json_raw(j, ",", 1);
    j->first[j->depth] = false;
    if (key) {
        json_escaped(j, key);
        json_raw(j, ":", 1);
    }
}

void kp_json_init(struct kp_json *j)
{
    memset(j, 0, sizeof *j);
    j->first[0] = true;
    json_reserve(j, 0);
    j->data[0] = '\0';
}

void kp_json_fini(struct kp_json *j)
{
    kp_free(j->data);
    memset(j, 0, sizeof *j);
}

void kp_json_object_begin(struct kp_json *j, const char *key)
{
    json_member(j, key);
    json_raw(j, "{", 1);
    if (j->depth < KP_JSON_DEPTH)
        j->depth++;
    j->first[j->depth] = true;
}

void kp_json_object_end(struct kp_json *j)
{
    json_raw(j, "}", 1);
    if (j->depth > 0)
        j->depth--;
}

void kp_json_array_begin(struct kp_json *j, const char *key)
{
    json_member(j, key);
    json_raw(j, "[", 1);
    if (j->depth < KP_JSON_DEPTH)
        j->depth++;
    j->first[j->depth] = true;
}

void kp_json_array_end(struct kp_json *j)
{
    json_raw(j, "]", 1);
    if (j->depth > 0)
        j->depth--;
}

void kp_json_null(struct kp_json *j, const char *key)
{
    json_member(j, key);
    json_raw(j, "null", 4);
}

void kp_json_u64(struct kp_json *j, const char *key, uint64_t value)
{
    char num[32];
    int n = snprintf(num, sizeof num, "%llu", (unsigned long long)value);
    json_member(j, key);
    json_raw(j, num, (size_t)n);
}

void kp_json_str(struct kp_json *j, const char *key, const char *value)
{
    json_member(j, key);
    json_escaped(j, value);
}

void kp_stats_json(const struct kp_stats *s, struct kp_json *j)
{
#define XX(name) kp_json_u64(j, #name, s->name);
    KP_COUNTERS(XX)
#undef XX
}

/* error: tables generated from KP_ERRORS; see error.h. */
#include "error.h"

#include <stddef.h>
#include <stdint.h>

#include "stats.h"

static const char *const error_messages[] = {
#define XX(name, code, counter, msg) msg,
    KP_ERRORS(XX)
#undef XX
};

static const char *const error_names[] = {
#define XX(name, code, counter, msg) #name,
    KP_ERRORS(XX)
#undef XX
};

static const Kelpie__V1__Code error_codes[] = {
#define XX(name, code, counter, msg) KELPIE__V1__CODE__##code,
    KP_ERRORS(XX)
#undef XX
};

const char *kp_strerror(enum kp_err err)
{
    if ((unsigned)err >= KP_ERR_COUNT)
        return "unknown error";
    return error_messages[err];
}

const char *kp_err_name(enum kp_err err)
{
    if ((unsigned)err >= KP_ERR_COUNT)
        return "EUNKNOWN";
    return error_names[err];
}

Kelpie__V1__Code kp_err_code(enum kp_err err)
{
    if ((unsigned)err >= KP_ERR_COUNT)
        return KELPIE__V1__CODE__INTERNAL;
    return error_codes[err];
}

/* struct kp_stats with one more slot, `none`, past its end: the counter
 * column becomes a table of offsets, and an offset past struct kp_stats
 * means "counts nothing". */
struct error_counters {
#define XX(name) uint64_t name;
    KP_COUNTERS(XX)
#undef XX
    uint64_t none;
};
_Static_assert(offsetof(struct error_counters, none) == sizeof(struct kp_stats),
               "struct error_counters must lay out like struct kp_stats");

static const size_t error_counter[] = {
#define XX(name, code, counter, msg) offsetof(struct error_counters, counter),
    KP_ERRORS(XX)
#undef XX
};

void kp_err_count(enum kp_err err, struct kp_stats *s)
{
    if ((unsigned)err >= KP_ERR_COUNT || error_counter[err] >= sizeof *s)
        return;
    (*(uint64_t *)((char *)s + error_counter[err]))++;
}

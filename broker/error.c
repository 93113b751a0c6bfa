/* error: tables generated from KP_ERRORS; see error.h. */
#include "error.h"

static const char *const error_messages[] = {
#define XX(name, code, msg) msg,
    KP_ERRORS(XX)
#undef XX
};

static const char *const error_names[] = {
#define XX(name, code, msg) #name,
    KP_ERRORS(XX)
#undef XX
};

static const Kelpie__V1__Code error_codes[] = {
#define XX(name, code, msg) KELPIE__V1__CODE__##code,
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

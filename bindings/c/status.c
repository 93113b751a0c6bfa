/*
 * status.c: names and descriptions of kelpie_status, generated from the one
 * X-macro list in kelpie.h so the enum and its strings cannot drift apart.
 */
#include "kelpie.h"
#include "kelpie/v1/header.pb-c.h"

/* kelpie.h promises that 0..16 are kelpie.v1.Code exactly as on the wire
 * (the library passes an ERROR's code through unchanged); the generated
 * header is the definition, so a renumbering fails the build here. */
#define KPC_SAME_CODE(name)                                                                        \
    _Static_assert((int)KELPIE_##name == (int)KELPIE__V1__CODE__##name,                            \
                   "kelpie.h: KELPIE_" #name " is not kelpie.v1.Code " #name);
KPC_SAME_CODE(OK)
KPC_SAME_CODE(CANCELLED)
KPC_SAME_CODE(UNKNOWN)
KPC_SAME_CODE(INVALID_ARGUMENT)
KPC_SAME_CODE(DEADLINE_EXCEEDED)
KPC_SAME_CODE(NOT_FOUND)
KPC_SAME_CODE(ALREADY_EXISTS)
KPC_SAME_CODE(PERMISSION_DENIED)
KPC_SAME_CODE(RESOURCE_EXHAUSTED)
KPC_SAME_CODE(FAILED_PRECONDITION)
KPC_SAME_CODE(ABORTED)
KPC_SAME_CODE(OUT_OF_RANGE)
KPC_SAME_CODE(UNIMPLEMENTED)
KPC_SAME_CODE(INTERNAL)
KPC_SAME_CODE(UNAVAILABLE)
KPC_SAME_CODE(DATA_LOSS)
KPC_SAME_CODE(UNAUTHENTICATED)
#undef KPC_SAME_CODE
_Static_assert((int)KELPIE_ERR_TIMEOUT > (int)KELPIE__V1__CODE__UNAUTHENTICATED,
               "kelpie.h: the library's own statuses must not overlap kelpie.v1.Code");

const char *kelpie_strerror(kelpie_status status)
{
    switch (status) {
#define KPC_STATUS_DESC(name, num, desc)                                                           \
    case KELPIE_##name:                                                                            \
        return desc;
        KELPIE_STATUS_LIST(KPC_STATUS_DESC)
#undef KPC_STATUS_DESC
    }
    return "unknown status";
}

const char *kelpie_status_name(kelpie_status status)
{
    switch (status) {
#define KPC_STATUS_NAME(name, num, desc)                                                           \
    case KELPIE_##name:                                                                            \
        return #name;
        KELPIE_STATUS_LIST(KPC_STATUS_NAME)
#undef KPC_STATUS_NAME
    }
    return "UNKNOWN_STATUS";
}

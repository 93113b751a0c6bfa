/*
 * status.c: names and descriptions of kelpie_status, generated from the one
 * X-macro list in kelpie.h so the enum and its strings cannot drift apart.
 */
#include "kelpie.h"

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

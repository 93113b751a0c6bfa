/* test_stats: counters reach the JSON, and the JSON writer escapes. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "stats.h"

Test(stats, every_counter_appears_with_its_value)
{
    struct kp_stats s;
    memset(&s, 0, sizeof s);
    s.bad_header = 3;
    s.replies_dropped_cancelled = 12345678901ull;
    struct kp_json j;
    kp_json_init(&j);
    kp_json_object_begin(&j, NULL);
    kp_stats_json(&s, &j);
    kp_json_object_end(&j);
    cr_assert(strstr(j.data, "\"bad_header\":3"), "%s", j.data);
    cr_assert(strstr(j.data, "\"replies_dropped_cancelled\":12345678901"), "%s", j.data);
#define XX(name) cr_assert(strstr(j.data, "\"" #name "\":"), "missing " #name);
    KP_COUNTERS(XX)
#undef XX
    cr_assert_eq(j.data[0], '{');
    cr_assert_eq(j.data[j.len - 1], '}');
    cr_assert_null(strstr(j.data, ",,"));
    cr_assert_null(strstr(j.data, "{,"));
    kp_json_fini(&j);
}

Test(stats, nested_objects_and_escaping)
{
    struct kp_json j;
    kp_json_init(&j);
    kp_json_object_begin(&j, NULL);
    kp_json_u64(&j, "a", 1);
    kp_json_object_begin(&j, "services");
    kp_json_object_begin(&j, "we\"ird\\name\n");
    kp_json_u64(&j, "queued", 2);
    kp_json_object_end(&j);
    kp_json_object_begin(&j, "empty");
    kp_json_object_end(&j);
    kp_json_object_end(&j);
    kp_json_str(&j, "s", "x");
    kp_json_object_end(&j);
    cr_assert_str_eq(j.data, "{\"a\":1,\"services\":{\"we\\\"ird\\\\name\\u000a\":{\"queued\":2},"
                             "\"empty\":{}},\"s\":\"x\"}");
    kp_json_fini(&j);
}

Test(stats, large_documents_grow)
{
    struct kp_json j;
    kp_json_init(&j);
    kp_json_object_begin(&j, NULL);
    char key[32];
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof key, "service-%d", i);
        kp_json_u64(&j, key, (uint64_t)i);
    }
    kp_json_object_end(&j);
    cr_assert(strstr(j.data, "\"service-4999\":4999}"));
    cr_assert_eq(strlen(j.data), j.len);
    kp_json_fini(&j);
}

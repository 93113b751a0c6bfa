/* test_idmap: the id map and the byte-string map against a plain array
 * model under random churn (backward-shift deletion is easy to get wrong). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "idmap.h"

Test(idmap, empty_map_finds_nothing)
{
    struct kp_idmap m;
    kp_idmap_init(&m);
    cr_assert_null(kp_idmap_get(&m, 1));
    cr_assert_null(kp_idmap_get(&m, 0));
    cr_assert_null(kp_idmap_del(&m, 1));
    cr_assert_eq(kp_idmap_count(&m), 0);
    kp_idmap_fini(&m);
}

Test(idmap, put_replaces_and_del_returns_the_value)
{
    struct kp_idmap m;
    kp_idmap_init(&m);
    int a, b;
    kp_idmap_put(&m, 7, &a);
    kp_idmap_put(&m, 7, &b);
    cr_assert_eq(kp_idmap_count(&m), 1);
    cr_assert_eq(kp_idmap_get(&m, 7), &b);
    cr_assert_eq(kp_idmap_del(&m, 7), &b);
    cr_assert_null(kp_idmap_get(&m, 7));
    cr_assert_eq(kp_idmap_count(&m), 0);
    kp_idmap_fini(&m);
}

Test(idmap, random_churn_matches_a_model)
{
    enum { KEYS = 3000, OPS = 200000 };
    static char present[KEYS];
    static int values[KEYS];
    struct kp_idmap m;
    kp_idmap_init(&m);
    srand(1234);
    size_t count = 0;
    for (int op = 0; op < OPS; op++) {
        /* Keys clustered (sequential-ish ids) to provoke long probe runs. */
        uint64_t key = (uint64_t)(rand() % KEYS) + 1;
        if (rand() % 3) {
            if (!present[key - 1])
                count++;
            present[key - 1] = 1;
            kp_idmap_put(&m, key, &values[key - 1]);
        } else {
            void *v = kp_idmap_del(&m, key);
            cr_assert_eq(v, present[key - 1] ? &values[key - 1] : NULL);
            if (present[key - 1])
                count--;
            present[key - 1] = 0;
        }
        if (op % 1000 == 0) {
            for (uint64_t k = 1; k <= KEYS; k++)
                cr_assert_eq(kp_idmap_get(&m, k), present[k - 1] ? &values[k - 1] : NULL);
        }
    }
    cr_assert_eq(kp_idmap_count(&m), count);
    size_t pos = 0, seen = 0;
    uint64_t key;
    while (kp_idmap_next(&m, &pos, &key) != NULL) {
        cr_assert(present[key - 1]);
        seen++;
    }
    cr_assert_eq(seen, count);
    kp_idmap_fini(&m);
}

Test(bmap, byte_keys_compare_by_length_and_content)
{
    struct kp_bmap m;
    kp_bmap_init(&m);
    int a, b, c;
    kp_bmap_put(&m, "ab", 2, &a);
    kp_bmap_put(&m, "abc", 3, &b);
    kp_bmap_put(&m, "\0\0\0\0\1", 5, &c);
    cr_assert_eq(kp_bmap_get(&m, "ab", 2), &a);
    cr_assert_eq(kp_bmap_get(&m, "abc", 3), &b);
    cr_assert_eq(kp_bmap_get(&m, "\0\0\0\0\1", 5), &c);
    cr_assert_null(kp_bmap_get(&m, "a", 1));
    cr_assert_null(kp_bmap_get(&m, "\0\0\0\0\2", 5));
    cr_assert_eq(kp_bmap_del(&m, "ab", 2), &a);
    cr_assert_null(kp_bmap_get(&m, "ab", 2));
    cr_assert_eq(kp_bmap_count(&m), 2);
    kp_bmap_fini(&m);
}

Test(bmap, random_churn_matches_a_model)
{
    enum { KEYS = 1500, OPS = 60000 };
    static char keys[KEYS][8];
    static char present[KEYS];
    struct kp_bmap m;
    kp_bmap_init(&m);
    for (int i = 0; i < KEYS; i++) {
        /* ROUTER-style ids: a zero byte then a 32-bit counter. */
        keys[i][0] = 0;
        memcpy(&keys[i][1], &i, sizeof i);
    }
    srand(99);
    for (int op = 0; op < OPS; op++) {
        int k = rand() % KEYS;
        if (rand() % 2) {
            present[k] = 1;
            kp_bmap_put(&m, keys[k], 5, keys[k]);
        } else {
            cr_assert_eq(kp_bmap_del(&m, keys[k], 5), present[k] ? keys[k] : NULL);
            present[k] = 0;
        }
    }
    size_t count = 0;
    for (int k = 0; k < KEYS; k++) {
        cr_assert_eq(kp_bmap_get(&m, keys[k], 5), present[k] ? keys[k] : NULL);
        count += present[k];
    }
    cr_assert_eq(kp_bmap_count(&m), count);
    kp_bmap_fini(&m);
}

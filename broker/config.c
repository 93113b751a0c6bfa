/* config: flags > environment > ZPL file > defaults; see config.h. */
#include "config.h"

#include <czmq.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

enum config_kind { CONFIG_STR, CONFIG_U32, CONFIG_SIZE, CONFIG_LEVEL };

struct config_option {
    const char *flag;      /* without the leading "--" */
    const char *env;       /* environment variable */
    enum config_kind kind; /* how to parse */
    const char *def;       /* default, as text */
    const char *help;      /* one line */
    size_t offset;         /* field in struct kp_config */
};

static const struct config_option config_options[] = {
#define XX(field, flag, env, kind, def, help)                                                      \
    {flag, env, CONFIG_##kind, def, help, offsetof(struct kp_config, field)},
    KP_OPTIONS(XX)
#undef XX
};

#define CONFIG_NOPTIONS (sizeof config_options / sizeof config_options[0])

/* Ranges for the numeric options, by flag. */
static bool config_range(const char *flag, uint64_t *lo, uint64_t *hi)
{
    static const struct {
        const char *flag;
        uint64_t lo, hi;
    } ranges[] = {
        {"heartbeat-ms", 10, 3600000},         {"heartbeat-liveness", 1, 100},
        {"queue-limit", 1, 10000000},          {"client-max-inflight", 1, 10000000},
        {"max-message-size", 1024, INT32_MAX}, {"max-header-size", 64, INT32_MAX},
        {"shutdown-grace-ms", 0, 3600000},     {"peer-max-queued", 65536, 1ull << 62},
        {"max-queued", 65536, 1ull << 62},
    };
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
        if (strcmp(ranges[i].flag, flag) == 0) {
            *lo = ranges[i].lo;
            *hi = ranges[i].hi;
            return true;
        }
    }
    return false;
}

static const struct config_option *config_find(const char *flag, size_t len)
{
    for (size_t i = 0; i < CONFIG_NOPTIONS; i++) {
        if (strlen(config_options[i].flag) == len &&
            strncmp(config_options[i].flag, flag, len) == 0)
            return &config_options[i];
    }
    return NULL;
}

static bool config_parse_u64(const char *s, uint64_t *out)
{
    if (*s < '0' || *s > '9')
        return false;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return false;
    *out = v;
    return true;
}

/* Sets one option from text; source names where it came from, for errors. */
static bool config_set(struct kp_config *c, const struct config_option *o, const char *value,
                       const char *source, char *err, size_t errlen)
{
    void *field = (char *)c + o->offset;
    switch (o->kind) {
    case CONFIG_STR:
        if (value[0] == '\0') {
            snprintf(err, errlen, "%s: --%s must not be empty", source, o->flag);
            return false;
        }
        kp_free(*(char **)field);
        *(char **)field = kp_strdup(value);
        return true;
    case CONFIG_LEVEL:
        if (!kp_log_parse_level(value, field)) {
            snprintf(err, errlen, "%s: --%s must be error, warn, info or debug, not '%s'", source,
                     o->flag, value);
            return false;
        }
        return true;
    case CONFIG_U32:
    case CONFIG_SIZE: {
        uint64_t v, lo = 0, hi = UINT32_MAX;
        config_range(o->flag, &lo, &hi);
        if (!config_parse_u64(value, &v) || v < lo || v > hi) {
            snprintf(err, errlen, "%s: --%s must be a number in %" PRIu64 "..%" PRIu64 ", not '%s'",
                     source, o->flag, lo, hi, value);
            return false;
        }
        if (o->kind == CONFIG_U32)
            *(uint32_t *)field = (uint32_t)v;
        else
            *(uint64_t *)field = v;
        return true;
    }
    }
    return false;
}

void kp_config_init(struct kp_config *c)
{
    memset(c, 0, sizeof *c);
    char err[256];
    for (size_t i = 0; i < CONFIG_NOPTIONS; i++)
        config_set(c, &config_options[i], config_options[i].def, "default", err, sizeof err);
}

void kp_config_fini(struct kp_config *c)
{
    for (size_t i = 0; i < CONFIG_NOPTIONS; i++) {
        if (config_options[i].kind == CONFIG_STR) {
            char **field = (char **)((char *)c + config_options[i].offset);
            kp_free(*field);
            *field = NULL;
        }
    }
    kp_free(c->config_file);
    c->config_file = NULL;
}

/* A flag from argv, split into option and value. */
struct config_arg {
    const struct config_option *option; /* NULL for --config */
    const char *value;                  /* its value */
};

static bool config_load_file(struct kp_config *c, const char *path, char *err, size_t errlen)
{
    zconfig_t *root = zconfig_load(path);
    if (root == NULL) {
        snprintf(err, errlen, "--config: cannot read or parse ZPL file '%s'", path);
        return false;
    }
    bool ok = true;
    char source[512];
    snprintf(source, sizeof source, "config file %s", path);
    zconfig_t *broker = zconfig_locate(root, "broker");
    for (zconfig_t *item = broker ? zconfig_child(broker) : NULL; item && ok;
         item = zconfig_next(item)) {
        const char *name = zconfig_name(item);
        const struct config_option *o = config_find(name, strlen(name));
        if (o == NULL) {
            snprintf(err, errlen, "%s: unknown key 'broker/%s'", source, name);
            ok = false;
        } else {
            const char *value = zconfig_value(item);
            ok = config_set(c, o, value ? value : "", source, err, errlen);
        }
    }
    zconfig_destroy(&root);
    return ok;
}

enum kp_config_result kp_config_load(struct kp_config *c, int argc, char **argv, char *err,
                                     size_t errlen)
{
    enum kp_config_result result = KP_CONFIG_ERROR;
    struct config_arg *args = kp_calloc((size_t)argc + 1, sizeof *args);
    size_t nargs = 0;
    const char *config_file = getenv("KELPIED_CONFIG");

    /* 1. Read argv without applying it, so flags can override what follows. */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            result = KP_CONFIG_HELP;
            goto done;
        }
        if (strcmp(a, "--version") == 0) {
            result = KP_CONFIG_VERSION;
            goto done;
        }
        if (strncmp(a, "--", 2) != 0) {
            snprintf(err, errlen, "unexpected argument '%s' (see --help)", a);
            goto done;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        bool is_config = len == strlen("config") && strncmp(name, "config", len) == 0;
        const struct config_option *o = is_config ? NULL : config_find(name, len);
        if (!is_config && o == NULL) {
            snprintf(err, errlen, "unknown option '--%.*s' (see --help)", (int)len, name);
            goto done;
        }
        const char *value;
        if (eq) {
            value = eq + 1;
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            snprintf(err, errlen, "option '%s' needs a value", a);
            goto done;
        }
        if (is_config) {
            config_file = value;
            continue;
        }
        args[nargs].option = o;
        args[nargs].value = value;
        nargs++;
    }

    /* 2. Config file, 3. environment, 4. flags: later wins. */
    if (config_file && config_file[0]) {
        kp_free(c->config_file);
        c->config_file = kp_strdup(config_file);
        if (!config_load_file(c, config_file, err, errlen))
            goto done;
    }
    for (size_t i = 0; i < CONFIG_NOPTIONS; i++) {
        const char *value = getenv(config_options[i].env);
        if (value && !config_set(c, &config_options[i], value, config_options[i].env, err, errlen))
            goto done;
    }
    for (size_t i = 0; i < nargs; i++) {
        if (!config_set(c, args[i].option, args[i].value, "command line", err, errlen))
            goto done;
    }
    if (c->max_header_size > c->max_message_size) {
        snprintf(err, errlen,
                 "--max-header-size (%" PRIu64 ") must not exceed --max-message-size (%" PRIu64 ")",
                 c->max_header_size, c->max_message_size);
        goto done;
    }
    result = KP_CONFIG_RUN;
done:
    kp_free(args);
    return result;
}

void kp_config_usage(FILE *out)
{
    fprintf(out, "usage: kelpied [options]\n\n"
                 "The Kelpie message broker. Options come from flags, then the environment,\n"
                 "then the config file, then the defaults shown.\n\n");
    fprintf(out, "  --%-22s %s\n", "config FILE",
            "ZPL config file (env KELPIED_CONFIG); keys broker/<option>, e.g. broker/frontend");
    for (size_t i = 0; i < CONFIG_NOPTIONS; i++) {
        const struct config_option *o = &config_options[i];
        char flag[64];
        snprintf(flag, sizeof flag, "%s %s", o->flag,
                 o->kind == CONFIG_STR ? (strcmp(o->flag, "data-dir") == 0 ? "DIR" : "EP")
                                       : (o->kind == CONFIG_LEVEL ? "LEVEL" : "N"));
        fprintf(out, "  --%-22s %s\n  %-24s   (default %s, env %s)\n", flag, o->help, "", o->def,
                o->env);
    }
    fprintf(out, "  --%-22s %s\n  --%-22s %s\n", "help", "print this and exit", "version",
            "print the version and exit");
    fprintf(out, "\nSIGINT/SIGTERM: stop taking calls, let running ones finish within\n"
                 "--shutdown-grace-ms, then exit 0; a second signal exits at once.\n");
}

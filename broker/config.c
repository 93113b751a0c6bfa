/* config: flags > environment > ZPL file > defaults; see config.h. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "http.h"

enum config_kind { CONFIG_STR, CONFIG_U32, CONFIG_SIZE, CONFIG_LEVEL, CONFIG_BOOL };

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
    case CONFIG_BOOL:
        if (strcmp(value, "true") == 0 || strcmp(value, "1") == 0 || strcmp(value, "yes") == 0) {
            *(bool *)field = true;
        } else if (strcmp(value, "false") == 0 || strcmp(value, "0") == 0 ||
                   strcmp(value, "no") == 0) {
            *(bool *)field = false;
        } else {
            snprintf(err, errlen, "%s: --%s must be true or false, not '%s'", source, o->flag,
                     value);
            return false;
        }
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

/* Largest config file read; a bigger one is refused, not truncated. */
#define CONFIG_MAX_FILE (1u << 20)

/* Reads the whole file at path; on failure err says why ("cannot read"). */
static char *config_read_file(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "--config %s: %s", path, strerror(errno));
        return NULL;
    }
    char *text = kp_malloc(CONFIG_MAX_FILE + 1);
    size_t len = fread(text, 1, CONFIG_MAX_FILE + 1, f);
    bool bad = ferror(f) != 0;
    fclose(f);
    if (bad || len > CONFIG_MAX_FILE) {
        snprintf(err, errlen, "--config %s: %s", path,
                 bad ? "read error" : "larger than 1 MiB, not a config file");
        kp_free(text);
        return NULL;
    }
    text[len] = '\0';
    return text;
}

static bool config_name_char(char c, bool first)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return true;
    return !first && c != '\0' && strchr("$-_@.&+/", c) != NULL;
}

/* Parses one ZPL line (the subset kelpied reads: "name" or "name = value",
 * indented by 4 spaces per level, '#' comments, values bare or in quotes).
 * Returns false with why set on a syntax error; *depth < 0 for a blank or
 * comment line. The line is modified in place: name and value point into it. */
static bool config_parse_line(char *line, int *depth, char **name, char **value, const char **why)
{
    size_t indent = 0;
    while (line[indent] == ' ')
        indent++;
    char *p = line + indent;
    *depth = -1;
    *value = NULL;
    if (*p == '\0' || *p == '#' || *p == '\r')
        return true;
    if (*p == '\t' || indent % 4 != 0) {
        *why = "indent by multiples of 4 spaces (no tabs)";
        return false;
    }
    *depth = (int)(indent / 4);
    if (!config_name_char(*p, true)) {
        *why = "a name must start with a letter or digit";
        return false;
    }
    *name = p;
    while (config_name_char(*p, false))
        p++;
    char *end = p;
    while (*p == ' ')
        p++;
    if (*p == '=') {
        p++;
        while (*p == ' ')
            p++;
        if (*p == '"' || *p == '\'') {
            char quote = *p++;
            *value = p;
            while (*p && *p != quote)
                p++;
            if (*p != quote) {
                *why = "missing closing quote";
                return false;
            }
            *p++ = '\0';
        } else {
            *value = p;
            while (*p && *p != ' ' && *p != '#' && *p != '\r')
                p++;
            char stop = *p;
            *p = '\0';
            if (stop == '#') {
                *end = '\0';
                return true; /* the rest is a comment */
            }
            if (stop)
                p++;
        }
        while (*p == ' ' || *p == '\r')
            p++;
    }
    if (*p != '\0' && *p != '#') {
        *why = *value ? "unexpected text after the value" : "expected 'name = value'";
        return false;
    }
    *end = '\0';
    return true;
}

/* Applies the config file: a missing or unreadable file, a syntax error,
 * an unknown section or key and a bad value are each refused with the
 * file's name and, for what is in it, the line number. */
static bool config_load_file(struct kp_config *c, const char *path, char *err, size_t errlen)
{
    char *text = config_read_file(path, err, errlen);
    if (text == NULL)
        return false;
    bool ok = true, in_broker = false;
    unsigned lineno = 0;
    char *next = text;
    while (ok && next) {
        char *line = next;
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        lineno++;
        int depth;
        char *name, *value;
        const char *why = NULL;
        char source[600];
        snprintf(source, sizeof source, "config file %.500s line %u", path, lineno);
        if (!config_parse_line(line, &depth, &name, &value, &why)) {
            snprintf(err, errlen, "%s: syntax error: %s", source, why);
            ok = false;
        } else if (depth < 0) {
            continue;
        } else if (depth == 0) {
            in_broker = strcmp(name, "broker") == 0 && value == NULL;
            if (!in_broker) {
                snprintf(err, errlen, "%s: unknown section '%.100s' (the only one is 'broker')",
                         source, name);
                ok = false;
            }
        } else if (depth == 1 && value != NULL) {
            const struct config_option *o = config_find(name, strlen(name));
            if (o == NULL) {
                snprintf(err, errlen, "%s: unknown key 'broker/%.100s' (see --help)", source, name);
                ok = false;
            } else {
                ok = config_set(c, o, value, source, err, errlen);
            }
        } else {
            snprintf(err, errlen, "%s: '%.100s' %s", source, name,
                     depth == 1 ? "needs a value ('name = value')"
                                : "is nested too deep (keys go directly under 'broker')");
            ok = false;
        }
    }
    kp_free(text);
    return ok;
}

/* Returns true if ep reaches only this host: ipc://, inproc://, or tcp:// on
 * a loopback address (127.0.0.0/8, ::1, localhost). */
static bool config_local_endpoint(const char *ep)
{
    if (strncmp(ep, "tcp://", 6) != 0)
        return strncmp(ep, "ipc://", 6) == 0 || strncmp(ep, "inproc://", 9) == 0;
    const char *host = ep + 6;
    const char *semi = strchr(host, ';'); /* tcp://source;dest: the dest binds */
    if (semi)
        host = semi + 1;
    return strncmp(host, "127.", 4) == 0 || strncmp(host, "localhost:", 10) == 0 ||
           strncmp(host, "[::1]:", 6) == 0 || strncmp(host, "lo:", 3) == 0;
}

/* Secure by default: no non-loopback bind without CURVE unless --insecure,
 * and allow-lists only with a key to check them against. */
static bool config_check_security(const struct kp_config *c, char *err, size_t errlen)
{
    const char *lists[] = {c->allow_clients, c->allow_workers, c->allow_admins};
    const char *names[] = {"allow-clients", "allow-workers", "allow-admins"};
    for (size_t i = 0; i < 3; i++) {
        if (lists[i] && c->key == NULL) {
            snprintf(err, errlen,
                     "--%s needs --key: allow-lists are checked by CURVE, which "
                     "--key turns on",
                     names[i]);
            return false;
        }
    }
    if (c->http && !c->insecure && !kp_http_loopback(c->http)) {
        snprintf(err, errlen,
                 "refusing --http %.200s: not a loopback HOST:PORT, and the metrics endpoint has "
                 "no authentication (put a proxy in front of it, or give --insecure)",
                 c->http);
        return false;
    }
    if (c->key || c->insecure)
        return true;
    const struct {
        const char *flag;
        const char *ep;
    } eps[] = {{"frontend", c->frontend}, {"backend", c->backend}, {"intake", c->intake}};
    for (size_t i = 0; i < sizeof eps / sizeof eps[0]; i++) {
        if (!config_local_endpoint(eps[i].ep)) {
            snprintf(err, errlen,
                     "refusing to bind --%s %.200s without CURVE: it is not a loopback address, "
                     "and without --key anyone who reaches it can call any service and register "
                     "as a worker for any service. Give --key FILE (kelpie keygen) with "
                     "--allow-clients/--allow-workers/--allow-admins, or --insecure if the "
                     "network itself is trusted",
                     eps[i].flag, eps[i].ep);
            return false;
        }
    }
    return true;
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
        } else if (o != NULL && o->kind == CONFIG_BOOL) {
            value = "true"; /* --insecure takes no value */
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
    const struct {
        const char *flag;
        const char *ep;
    } eps[] = {{"frontend", c->frontend}, {"backend", c->backend}, {"intake", c->intake}};
    for (size_t i = 0; i < sizeof eps / sizeof eps[0]; i++) {
        /* "127.0.0.1:5555" would reach zmq_bind as an invalid endpoint after
         * the sockets before it were bound; say what is missing instead. */
        if (strstr(eps[i].ep, "://") == NULL) {
            snprintf(err, errlen,
                     "--%s '%.200s' has no transport: write tcp://%.200s (or ipc://PATH, "
                     "inproc://NAME)",
                     eps[i].flag, eps[i].ep, eps[i].ep);
            goto done;
        }
    }
    if (!config_check_security(c, err, errlen))
        goto done;
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
        const char *arg = o->kind == CONFIG_LEVEL            ? "LEVEL"
                          : o->kind == CONFIG_BOOL           ? ""
                          : o->kind != CONFIG_STR            ? "N"
                          : strcmp(o->flag, "data-dir") == 0 ? "DIR"
                          : strcmp(o->flag, "key") == 0 || strncmp(o->flag, "allow-", 6) == 0
                              ? "FILE"
                          : strcmp(o->flag, "http") == 0 ? "HOST:PORT"
                                                         : "EP";
        snprintf(flag, sizeof flag, "%s %s", o->flag, arg);
        fprintf(out, "  --%-22s %s\n  %-24s   (default %s, env %s)\n", flag, o->help, "", o->def,
                o->env);
    }
    fprintf(out, "  --%-22s %s\n  --%-22s %s\n", "help", "print this and exit", "version",
            "print the version and exit");
    fprintf(out, "\nSIGINT/SIGTERM: stop taking calls, let running ones finish within\n"
                 "--shutdown-grace-ms, then exit 0; a second signal exits at once.\n"
                 "SIGHUP: reread the --allow-* files (connections are kept).\n");
}

/* test_config: defaults, the flags > environment > file > defaults order,
 * and refusal of every kind of bad option. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

static const char *const tc_env[] = {
    "KELPIED_CONFIG",
    "KELPIED_FRONTEND",
    "KELPIED_BACKEND",
    "KELPIED_INTAKE",
    "KELPIED_DATA_DIR",
    "KELPIED_LOG_LEVEL",
    "KELPIED_HEARTBEAT_MS",
    "KELPIED_HEARTBEAT_LIVENESS",
    "KELPIED_QUEUE_LIMIT",
    "KELPIED_CLIENT_MAX_INFLIGHT",
    "KELPIED_MAX_MESSAGE_SIZE",
    "KELPIED_MAX_HEADER_SIZE",
    "KELPIED_SHUTDOWN_GRACE_MS",
    "KELPIED_KEY",
    "KELPIED_ALLOW_CLIENTS",
    "KELPIED_INSECURE",
    "KELPIED_HTTP",
};

static struct kp_config cfg;
static char err[512];

static void setup(void)
{
    for (size_t i = 0; i < sizeof tc_env / sizeof tc_env[0]; i++)
        unsetenv(tc_env[i]);
    kp_config_init(&cfg);
    err[0] = '\0';
}

static void teardown(void)
{
    kp_config_fini(&cfg);
}

TestSuite(config, .init = setup, .fini = teardown);

#define TC_ARGV(...) ((char *[]){"kelpied", __VA_ARGS__, NULL})
#define TC_ARGC(...) ((int)(sizeof((char *[]){"kelpied", __VA_ARGS__}) / sizeof(char *)))
#define TC_LOAD(...)                                                                               \
    kp_config_load(&cfg, TC_ARGC(__VA_ARGS__), TC_ARGV(__VA_ARGS__), err, sizeof err)

/* Writes text to a fresh temporary file; returns its path (static buffer). */
static const char *tc_file(const char *text)
{
    static char path[64];
    strcpy(path, "/tmp/kelpie-config-XXXXXX");
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

Test(config, defaults_match_the_documentation)
{
    char *argv[] = {"kelpied", NULL};
    cr_assert_eq(kp_config_load(&cfg, 1, argv, err, sizeof err), KP_CONFIG_RUN, "%s", err);
    cr_assert_str_eq(cfg.frontend, "tcp://127.0.0.1:5555");
    cr_assert_str_eq(cfg.backend, "tcp://127.0.0.1:5556");
    cr_assert_str_eq(cfg.intake, "tcp://127.0.0.1:5557");
    cr_assert_eq(cfg.log_level, KP_LOG_INFO);
    cr_assert_eq(cfg.heartbeat_ms, 1000);
    cr_assert_eq(cfg.heartbeat_liveness, 3);
    cr_assert_eq(cfg.queue_limit, 10000);
    cr_assert_eq(cfg.client_max_inflight, 10000);
    cr_assert_eq(cfg.max_message_size, 16u << 20);
    cr_assert_eq(cfg.max_header_size, 64u << 10);
    cr_assert_eq(cfg.shutdown_grace_ms, 5000);
    cr_assert_null(cfg.config_file);
}

Test(config, flags_in_both_spellings)
{
    cr_assert_eq(TC_LOAD("--frontend", "inproc://a", "--backend=inproc://b", "--queue-limit=7",
                         "--log-level", "debug", "--data-dir", "/tmp/x"),
                 KP_CONFIG_RUN, "%s", err);
    cr_assert_str_eq(cfg.frontend, "inproc://a");
    cr_assert_str_eq(cfg.backend, "inproc://b");
    cr_assert_eq(cfg.queue_limit, 7);
    cr_assert_eq(cfg.log_level, KP_LOG_DEBUG);
    cr_assert_str_eq(cfg.data_dir, "/tmp/x");
}

Test(config, help_and_version)
{
    cr_assert_eq(TC_LOAD("--queue-limit", "5", "--help"), KP_CONFIG_HELP);
    cr_assert_eq(TC_LOAD("--version"), KP_CONFIG_VERSION);
    cr_assert_eq(TC_LOAD("-h"), KP_CONFIG_HELP);
}

Test(config, precedence_flags_then_env_then_file_then_defaults)
{
    const char *path = tc_file("broker\n"
                               "    frontend = \"tcp://127.0.0.1:7001\"\n"
                               "    backend = \"tcp://127.0.0.1:7002\"\n"
                               "    intake = \"tcp://127.0.0.1:7003\"\n"
                               "    heartbeat-ms = 250\n");
    setenv("KELPIED_BACKEND", "tcp://127.0.0.1:8002", 1);
    setenv("KELPIED_INTAKE", "tcp://127.0.0.1:8003", 1);
    cr_assert_eq(TC_LOAD("--config", (char *)path, "--intake", "tcp://127.0.0.1:9003"),
                 KP_CONFIG_RUN, "%s", err);
    cr_assert_str_eq(cfg.frontend, "tcp://127.0.0.1:7001", "file over default");
    cr_assert_str_eq(cfg.backend, "tcp://127.0.0.1:8002", "env over file");
    cr_assert_str_eq(cfg.intake, "tcp://127.0.0.1:9003", "flag over env");
    cr_assert_eq(cfg.heartbeat_ms, 250);
    cr_assert_eq(cfg.queue_limit, 10000, "default where nobody set it");
    cr_assert_str_eq(cfg.config_file, path);
    unlink(path);
}

Test(config, config_file_from_the_environment)
{
    const char *path = tc_file("broker\n    queue-limit = 33\n");
    setenv("KELPIED_CONFIG", path, 1);
    char *argv[] = {"kelpied", NULL};
    cr_assert_eq(kp_config_load(&cfg, 1, argv, err, sizeof err), KP_CONFIG_RUN, "%s", err);
    cr_assert_eq(cfg.queue_limit, 33);
    unlink(path);
}

Test(config, bad_config_files_are_refused)
{
    const char *path = tc_file("broker\n    no-such-key = 1\n");
    cr_assert_eq(TC_LOAD("--config", (char *)path), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "no-such-key"), "%s", err);
    unlink(path);
    path = tc_file("broker\n    heartbeat-ms = fast\n");
    cr_assert_eq(TC_LOAD("--config", (char *)path), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "heartbeat-ms"), "%s", err);
    unlink(path);
    cr_assert_eq(TC_LOAD("--config", "/nonexistent/kelpied.cfg"), KP_CONFIG_ERROR);
}

/* Writes text to a config file, loads it, expects an error containing each
 * of want[] (NULL-terminated). */
static void tc_refused(const char *text, const char *const *want)
{
    const char *path = tc_file(text);
    kp_config_fini(&cfg);
    kp_config_init(&cfg);
    err[0] = '\0';
    cr_assert_eq(TC_LOAD("--config", (char *)path), KP_CONFIG_ERROR, "accepted: %s", text);
    unlink(path);
    cr_assert_null(strchr(err, '\n'), "not one line: %s", err);
    for (size_t i = 0; want[i]; i++)
        cr_assert(strstr(err, want[i]), "'%s' not in: %s", want[i], err);
}

Test(config, unknown_sections_and_nested_keys_are_refused_with_their_line)
{
    /* A typo in the section name used to be ignored silently. */
    tc_refused("# kelpied\nbrokr\n    queue-limit = 5\n",
               (const char *[]){"line 2", "unknown section 'brokr'", NULL});
    tc_refused("broker\n    queue-limit = 5\nlogging\n    level = debug\n",
               (const char *[]){"line 3", "unknown section 'logging'", NULL});
    tc_refused("broker\n    queue-limit = 5\n        deeper = 1\n",
               (const char *[]){"line 3", "deeper", NULL});
    tc_refused("broker\n    queue-limit\n", (const char *[]){"line 2", "needs a value", NULL});
    tc_refused("broker\n\n    queu-limit = 5\n",
               (const char *[]){"line 3", "unknown key 'broker/queu-limit'", NULL});
    tc_refused("broker\n    heartbeat-ms = 5\n",
               (const char *[]){"line 2", "heartbeat-ms", "10..3600000", NULL});
}

Test(config, a_missing_file_and_a_syntax_error_are_told_apart)
{
    cr_assert_eq(TC_LOAD("--config", "/nonexistent/kelpied.cfg"), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "/nonexistent/kelpied.cfg") && strstr(err, "No such file"), "%s", err);
    cr_assert_null(strstr(err, "syntax"), "%s", err);
    tc_refused("broker\n    frontend = \"tcp://127.0.0.1:1\n",
               (const char *[]){"line 2", "syntax error", "quote", NULL});
    tc_refused("broker\n  queue-limit = 5\n",
               (const char *[]){"line 2", "syntax error", "4 spaces", NULL});
    tc_refused("broker\n    queue-limit = 5 6\n", (const char *[]){"line 2", "syntax error", NULL});
}

Test(config, comments_quotes_and_blank_lines_are_read)
{
    const char *path = tc_file("# kelpied.cfg\n\nbroker   # the only section\n"
                               "    frontend = \"tcp://127.0.0.1:7001\"  # clients\n"
                               "    backend = 'tcp://127.0.0.1:7002'\n"
                               "    queue-limit = 44# no space before the comment\n"
                               "\n    shutdown-grace-ms = 10\n");
    cr_assert_eq(TC_LOAD("--config", (char *)path), KP_CONFIG_RUN, "%s", err);
    unlink(path);
    cr_assert_str_eq(cfg.frontend, "tcp://127.0.0.1:7001");
    cr_assert_str_eq(cfg.backend, "tcp://127.0.0.1:7002");
    cr_assert_eq(cfg.queue_limit, 44);
    cr_assert_eq(cfg.shutdown_grace_ms, 10);
}

Test(config, an_endpoint_without_a_transport_is_refused)
{
    cr_assert_eq(TC_LOAD("--frontend", "127.0.0.1:5555"), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "--frontend") && strstr(err, "tcp://127.0.0.1:5555"), "%s", err);
    kp_config_fini(&cfg);
    kp_config_init(&cfg);
    setenv("KELPIED_BACKEND", "localhost:5556", 1);
    cr_assert_eq(TC_LOAD("--frontend", "ipc:///tmp/x"), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "--backend") && strstr(err, "tcp://localhost:5556"), "%s", err);
    unsetenv("KELPIED_BACKEND");
}

Test(config, bad_values_name_the_option_and_the_source)
{
    static const char *const bad[][2] = {
        {"--heartbeat-ms", "0"},
        {"--heartbeat-ms", "abc"},
        {"--heartbeat-ms", "-5"},
        {"--heartbeat-ms", "10x"},
        {"--heartbeat-liveness", "0"},
        {"--queue-limit", "0"},
        {"--queue-limit", "99999999999"},
        {"--client-max-inflight", ""},
        {"--max-message-size", "10"},
        {"--max-header-size", "8"},
        {"--log-level", "loud"},
        {"--frontend", ""},
        {"--shutdown-grace-ms", "3600001"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kp_config_fini(&cfg);
        kp_config_init(&cfg);
        cr_assert_eq(TC_LOAD((char *)bad[i][0], (char *)bad[i][1]), KP_CONFIG_ERROR, "%s %s",
                     bad[i][0], bad[i][1]);
        cr_assert(strstr(err, bad[i][0] + 2), "error '%s' does not name %s", err, bad[i][0]);
    }
    setenv("KELPIED_QUEUE_LIMIT", "lots", 1);
    cr_assert_eq(TC_LOAD("--frontend", "inproc://x"), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "KELPIED_QUEUE_LIMIT"), "%s", err);
}

Test(config, unknown_options_and_missing_values)
{
    cr_assert_eq(TC_LOAD("--no-such-option", "1"), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "no-such-option"), "%s", err);
    cr_assert_eq(TC_LOAD("--queue-limit"), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "needs a value"), "%s", err);
    cr_assert_eq(TC_LOAD("stray"), KP_CONFIG_ERROR);
}

Test(config, header_limit_cannot_exceed_message_limit)
{
    cr_assert_eq(TC_LOAD("--max-message-size", "4096", "--max-header-size", "8192"),
                 KP_CONFIG_ERROR);
    cr_assert(strstr(err, "max-header-size"), "%s", err);
    cr_assert_eq(TC_LOAD("--max-message-size", "4096", "--max-header-size", "1024"), KP_CONFIG_RUN,
                 "%s", err);
}

Test(config, usage_lists_every_option)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    kp_config_usage(f);
    fclose(f);
    static const char *const flags[] = {
        "--frontend",
        "--backend",
        "--intake",
        "--data-dir",
        "--config",
        "--log-level",
        "--heartbeat-ms",
        "--heartbeat-liveness",
        "--queue-limit",
        "--client-max-inflight",
        "--max-message-size",
        "--max-header-size",
        "--shutdown-grace-ms",
        "--help",
        "--version",
        "KELPIED_FRONTEND",
    };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        cr_assert(strstr(text, flags[i]), "--help does not mention %s", flags[i]);
    free(text);
}

/* Secure by default (issue 16): no public bind without CURVE unless
 * --insecure; loopback, ipc:// and inproc:// need neither. */
Test(config, public_bind_needs_key_or_insecure)
{
    cr_assert_eq(TC_LOAD("--frontend", "tcp://0.0.0.0:5555"), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "refusing to bind --frontend tcp://0.0.0.0:5555 without CURVE"), "%s",
              err);
    cr_assert(strstr(err, "--insecure"), "%s", err);
    kp_config_fini(&cfg);
    kp_config_init(&cfg);
    cr_assert_eq(TC_LOAD("--backend", "tcp://10.1.2.3:5556", "--insecure"), KP_CONFIG_RUN, "%s",
                 err);
    cr_assert(cfg.insecure);
    kp_config_fini(&cfg);
    kp_config_init(&cfg);
    cr_assert_eq(TC_LOAD("--intake", "tcp://0.0.0.0:5557", "--key", "/etc/kelpie/broker.key"),
                 KP_CONFIG_RUN, "%s", err);
    kp_config_fini(&cfg);
    kp_config_init(&cfg);
    cr_assert_eq(TC_LOAD("--frontend", "tcp://localhost:5555", "--backend", "ipc:///tmp/kb",
                         "--intake", "tcp://[::1]:5557"),
                 KP_CONFIG_RUN, "%s", err);
}

Test(config, insecure_from_environment_and_file)
{
    setenv("KELPIED_INSECURE", "yes", 1);
    cr_assert_eq(TC_LOAD("--frontend", "tcp://0.0.0.0:5555"), KP_CONFIG_RUN, "%s", err);
    unsetenv("KELPIED_INSECURE");
    kp_config_fini(&cfg);
    kp_config_init(&cfg);
    char *path = (char *)tc_file("broker\n    insecure = maybe\n");
    cr_assert_eq(TC_LOAD("--config", path), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "--insecure must be true or false, not 'maybe'"), "%s", err);
    unlink(path);
}

Test(config, allow_lists_need_a_key)
{
    cr_assert_eq(TC_LOAD("--allow-clients", "/etc/kelpie/clients.allow"), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "--allow-clients needs --key"), "%s", err);
}

Test(config, http_off_loopback_needs_insecure)
{
    cr_assert_eq(TC_LOAD("--http", "0.0.0.0:9464"), KP_CONFIG_ERROR);
    cr_assert(strstr(err, "no authentication"), "%s", err);
    kp_config_fini(&cfg);
    kp_config_init(&cfg);
    cr_assert_eq(TC_LOAD("--http", "127.0.0.1:9464"), KP_CONFIG_RUN, "%s", err);
    cr_assert_str_eq(cfg.http, "127.0.0.1:9464");
}

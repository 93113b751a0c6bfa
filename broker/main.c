/* main: kelpied's entry point. Options into a config, signals into the
 * broker's wake pipe, then the loop; nothing else lives here. */
#include <czmq.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "broker.h"
#include "config.h"
#include "log.h"

#ifndef KELPIE_VERSION
#define KELPIE_VERSION "0.0.0"
#endif

static struct kp_broker *main_broker;
/* A stop asked for while the broker was still starting (binding, opening
 * its store): honoured as soon as it exists, so a Ctrl-C or a service
 * manager's SIGTERM during start-up is a clean exit 0, not a death by signal. */
static volatile sig_atomic_t main_stop_early;

static void main_on_signal(int sig)
{
    if (main_broker == NULL) {
        if (sig != SIGHUP)
            main_stop_early = 1;
        return;
    }
    if (sig == SIGHUP)
        kp_broker_reload(main_broker);
    else
        kp_broker_stop(main_broker);
}

int main(int argc, char **argv)
{
    /* czmq must never install its own SIGINT/SIGTERM handlers. */
    zsys_handler_set(NULL);

    struct kp_config cfg;
    kp_config_init(&cfg);
    char err[512] = "";
    switch (kp_config_load(&cfg, argc, argv, err, sizeof err)) {
    case KP_CONFIG_HELP:
        kp_config_usage(stdout);
        kp_config_fini(&cfg);
        return 0;
    case KP_CONFIG_VERSION:
        printf("kelpied %s (protocol KLP/1)\n", KELPIE_VERSION);
        kp_config_fini(&cfg);
        return 0;
    case KP_CONFIG_ERROR:
        fprintf(stderr, "kelpied: %s\n", err);
        kp_config_fini(&cfg);
        return 2;
    case KP_CONFIG_RUN:
        break;
    }
    kp_log_set_level(cfg.log_level);
    if (!kp_log_set_format(cfg.log_format)) {
        fprintf(stderr, "kelpied: --log-format '%s': expected text or json\n", cfg.log_format);
        kp_config_fini(&cfg);
        return 2;
    }

    /* Before start-up, which may take a while (a store to open or recover):
     * libzmq's threads block signals, so they all land here. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = main_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct kp_broker *b;
    if (kp_broker_new(&cfg, NULL, &b) != KP_OK) {
        kp_config_fini(&cfg);
        return 1;
    }
    kp_config_fini(&cfg);

    main_broker = b;
    if (main_stop_early)
        kp_broker_stop(b);

    enum kp_err rc = kp_broker_run(b);
    main_broker = NULL;
    kp_broker_destroy(&b);
    return rc == KP_OK ? 0 : 1;
}

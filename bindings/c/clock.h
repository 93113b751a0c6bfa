/*
 * clock.h: the library's one clock, CLOCK_MONOTONIC in milliseconds. Every
 * deadline, heartbeat and liveness window is measured with it, so a wall
 * clock step never fires or stalls a timer.
 */
#ifndef KP_CLOCK_H
#define KP_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline int64_t kp_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#endif /* KP_CLOCK_H */

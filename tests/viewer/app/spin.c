/* Busy loops with distinct names, called from traced_app.py through ctypes so that a
 * native profile of a Python process shows which one ran: one inside the slow span,
 * one outside every span. noinline + a volatile sink keep each a real frame. */
#include <stdint.h>
#include <time.h>

static volatile uint64_t sink;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

__attribute__((noinline)) static void burn(uint64_t until_ns) {
    while (now_ns() < until_ns)
        for (int i = 0; i < 10000; i++)
            sink += (uint64_t)i * 2654435761u;
}

__attribute__((noinline)) void spin_inside_span(int ms) { burn(now_ns() + (uint64_t)ms * 1000000u); }

__attribute__((noinline)) void spin_outside_span(int ms) { burn(now_ns() + (uint64_t)ms * 1000000u); }

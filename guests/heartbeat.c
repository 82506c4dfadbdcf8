/* heartbeat: prints `tick N` on COM1 at hz ticks per second, driven by the PIT interrupt.
 * A guest whose timer survives migration keeps counting without a gap or a burst. */
#include "common/rt.h"

static const char *const known[] = {"hz", "count", 0};

void guest_main(void)
{
    param_check("heartbeat", known);
    u64 hz = param_u64("hz", 10);
    u64 count = param_u64("count", 0);
    if (hz < 1 || hz > RT_TICK_HZ) {
        rt_printf("heartbeat: hz=%lu out of range 1..%u\n", hz, RT_TICK_HZ);
        rt_exit(EXIT_BAD_PARAM);
    }
    rt_printf("heartbeat: hz=%lu count=%lu\n", hz, count);

    u64 printed = 0;
    for (;;) {
        /* Tick N is due after N / hz seconds of PIT time, so any hz <= 1000 is exact on
         * average even when it does not divide the PIT rate. */
        u64 due = rt_ticks * hz / RT_TICK_HZ;
        while (printed < due) {
            printed++;
            rt_printf("tick %lu\n", printed);
            if (count && printed >= count) {
                rt_printf("heartbeat: done\n");
                rt_exit(EXIT_OK);
            }
        }
        rt_idle();
    }
}

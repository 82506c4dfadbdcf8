/*
 * The dirty guest's header: a fixed place in guest RAM where a host-side verifier
 * (src/vmferry/guests/verify.py, which restates this layout) finds everything it needs.
 * All fields little-endian; offsets are part of the layout version.
 *
 *   GPA 0x9000  magic "VMFDIRTY" ... see struct below
 *   table_gpa   u32 generation per page, entry i = page i (0 = never written); the header's
 *               table_sum catches a stale table page whose data pages are stale too
 *   ws_gpa      npages pages of 4 KiB; every u64 of page i = (generation << 32) | i
 */
#ifndef VMFERRY_DIRTY_LAYOUT_H
#define VMFERRY_DIRTY_LAYOUT_H

#include "common/rt.h"

#define DIRTY_HEADER_GPA 0x9000ul
#define DIRTY_MAGIC 0x5954524944464D56ull /* "VMFDIRTY" as little-endian bytes */
/* 2: `fill` (the high half of version 1's u32 pattern, 0 there). A guest with fill=stamp still
 * says version 1: its memory is exactly version 1's. */
#define DIRTY_LAYOUT_VERSION 2u
/* compute=1: the second vCPU's loop counter (u64), right after the header, for a host to read. */
#define DIRTY_COMPUTE_GPA (DIRTY_HEADER_GPA + 0x80)
#define DIRTY_NO_PAGE 0xFFFFFFFFFFFFFFFFull /* `inflight` when no page is being rewritten */

enum dirty_pattern { PATTERN_UNIFORM = 1, PATTERN_HOT = 2 };
/* What a page holds besides the stamps in its first and last u64 (dirty.c says how). */
enum dirty_fill { FILL_STAMP = 0, FILL_TEXT = 1, FILL_SPARSE = 2, FILL_RANDOM = 3 };

struct dirty_header {
    u64 magic;          /* 0x00 DIRTY_MAGIC, written last when the header is set up */
    u32 version;        /* 0x08 DIRTY_LAYOUT_VERSION */
    u32 header_size;    /* 0x0c sizeof(struct dirty_header) */
    u64 ws_gpa;         /* 0x10 first page of the working set */
    u64 npages;         /* 0x18 pages in the working set */
    u64 table_gpa;      /* 0x20 the generation table */
    u32 entry_size;     /* 0x28 bytes per table entry (4) */
    u32 page_size;      /* 0x2c 4096 */
    u64 generation;     /* 0x30 the last generation stamped (1..2^32-1), 0 before any write */
    u64 inflight;       /* 0x38 page being rewritten, or DIRTY_NO_PAGE */
    u64 filled;         /* 0x40 pages [0, filled) have been written at least once */
    u64 writes;         /* 0x48 page writes since boot, the initial fill included */
    u64 verify_passes;  /* 0x50 in-guest checks that passed */
    u64 verify_fails;   /* 0x58 in-guest checks that failed */
    u32 rate_mib_s;     /* 0x60 the rate parameter */
    u16 pattern;        /* 0x64 enum dirty_pattern */
    u16 fill;           /* 0x66 enum dirty_fill (version 2; 0 in version 1) */
    u32 hot_percent;    /* 0x68 */
    u32 hot_writes;     /* 0x6c percent of writes that go to the hot pages */
    u64 seed;           /* 0x70 */
    u64 table_sum;      /* 0x78 sum of all table entries mod 2^64, updated before the entry */
};

_Static_assert(sizeof(struct dirty_header) == 0x80, "header layout is part of the version");

#endif

/* What the disk guest writes into each 512-byte sector, as the host-side verifier reads it
 * (restated in vmferry/guests/verify_disk.py). Little-endian u64 words:
 *
 *   word 0       DISK_SECTOR_MAGIC
 *   word 1       the sector's own LBA
 *   word 2       the generation of the write (1, 2, ...; one generation per 4 KiB block write)
 *   words 3..62  disk_fill(lba, gen, i)
 *   word 63      FNV-1a-64 over words 0..62, word by word
 *
 * A sector of zeros was never written. The guest writes 4 KiB blocks (8 sectors, one generation)
 * over its working set, sectors 0 .. dws MiB, and keeps the generation of each block in a table
 * in its RAM.
 */
#ifndef VMFERRY_DISK_LAYOUT_H
#define VMFERRY_DISK_LAYOUT_H

#define DISK_SECTOR_MAGIC 0x31534b4459524546ull /* "FERYDKS1" */
#define DISK_SECTOR_WORDS 64
#define DISK_BLOCK_SECTORS 8
#define DISK_FNV_OFFSET 0xcbf29ce484222325ull
#define DISK_FNV_PRIME 0x100000001b3ull

static inline u64 disk_fill(u64 lba, u64 gen, u64 i)
{
    return (lba * 0x9E3779B97F4A7C15ull) ^ (gen * 0xC2B2AE3D27D4EB4Full) ^ i;
}

#endif

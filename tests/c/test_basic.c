/*
 * End-to-end test of the C API: create, unaligned I/O, write_zeroes, discard, flush, resize, info,
 * string getters, map, check, error paths, a backing chain; then qemu-img check and qemu-img
 * compare against raw files holding the same data.
 *
 * Usage: test_basic DIR   (DIR: an empty scratch directory)
 */
#define _POSIX_C_SOURCE 200809L

#include "qcow2rs.h"
#include "check.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void fill_pattern(uint8_t *buf, size_t len, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < len; i++) {
        x = x * 1103515245u + 12345u;
        buf[i] = (uint8_t)(x >> 16);
    }
}

static void write_raw(const char *path, const uint8_t *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

/* Write at `off` in the image and in the shadow copy. */
static void write_both(qcow2_image *img, uint8_t *shadow, uint64_t off, size_t len, uint32_t seed) {
    uint8_t *buf = xcalloc(len);
    fill_pattern(buf, len, seed);
    MUST(qcow2_write(img, off, buf, len));
    memcpy(shadow + off, buf, len);
    free(buf);
}

/* Read [off, off+len) and compare with the shadow copy. */
static void verify(const qcow2_image *img, const uint8_t *shadow, uint64_t off, size_t len) {
    uint8_t *buf = xcalloc(len);
    MUST(qcow2_read(img, off, buf, len));
    if (memcmp(buf, shadow + off, len) != 0) {
        size_t i = 0;
        while (buf[i] == shadow[off + i]) i++;
        fprintf(stderr, "data mismatch in [%llu, +%zu) at guest offset %llu: got %u, want %u\n",
                (unsigned long long)off, len, (unsigned long long)(off + i), buf[i],
                shadow[off + i]);
        failures++;
    }
    free(buf);
}

static void test_error_reporting(const char *dir) {
    /* Open of a missing file: an I/O error with ENOENT, and a message naming the file. */
    char *missing = path_in(dir, "does-not-exist.qcow2");
    qcow2_image *img = (qcow2_image *)(uintptr_t)0x1; /* must stay untouched on failure */
    EXPECT_ERR(qcow2_open(missing, 0, &img), QCOW2_ERR_IO);
    CHECK(img == (qcow2_image *)(uintptr_t)0x1);
    CHECK(qcow2_last_error() == QCOW2_ERR_IO);
    CHECK(qcow2_last_errno() == ENOENT);
    CHECK(strstr(last_message(), missing) != NULL);

    /* The message API: length query, truncation, NUL termination. */
    size_t full = qcow2_last_error_message(NULL, 0);
    CHECK(full == strlen(last_message()));
    char small[5];
    memset(small, 'x', sizeof small);
    CHECK(qcow2_last_error_message(small, sizeof small) == full);
    CHECK(small[4] == '\0' && strlen(small) == 4);
    CHECK(strncmp(small, last_message(), 4) == 0);

    /* NULL handle, NULL buffers, NULL outputs: INVALID_ARGUMENT naming the parameter. */
    uint8_t buf[16] = {0};
    uint64_t size = 0;
    EXPECT_ERR(qcow2_read(NULL, 0, buf, sizeof buf), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(qcow2_last_errno() == EINVAL);
    CHECK(strstr(last_message(), "qcow2_read") != NULL);
    CHECK(strstr(last_message(), "img") != NULL);
    EXPECT_ERR(qcow2_write(NULL, 0, buf, sizeof buf), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_flush(NULL), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_virtual_size(NULL, &size), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_open(NULL, 0, &img), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_open(missing, 0, NULL), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_create(NULL, 1 << 20, NULL), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_create_options_init(NULL), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_info(NULL, NULL), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(qcow2_close(NULL) == QCOW2_OK);
    /* Success clears the thread's last error. */
    CHECK(qcow2_last_error() == QCOW2_OK);
    CHECK(qcow2_last_errno() == 0);
    CHECK(qcow2_last_error_message(NULL, 0) == 0);

    /* Bad option values are rejected before anything is created. */
    char *bad = path_in(dir, "bad.qcow2");
    qcow2_create_options opts;
    MUST(qcow2_create_options_init(&opts));
    opts.compat = 7;
    EXPECT_ERR(qcow2_create(bad, 1 << 20, &opts), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(last_message(), "compat") != NULL);
    CHECK(access(bad, F_OK) != 0);
    MUST(qcow2_create_options_init(&opts));
    opts.cluster_size = 1000; /* not a power of two: the core says no */
    EXPECT_ERR(qcow2_create(bad, 1 << 20, &opts), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_open(missing, 0x100, &img), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(last_message(), "flags") != NULL);

    CHECK(strcmp(qcow2_strerror(QCOW2_ERR_LOCKED), "image is locked") == 0);
    CHECK(strcmp(qcow2_strerror(12345), "unknown error") == 0);
    free(bad);
    free(missing);
}

static void test_main_image(const char *dir) {
    char *path = path_in(dir, "main.qcow2");
    char *raw = path_in(dir, "main.raw");
    const uint64_t size = 16u << 20;
    const uint64_t grown = size + (1u << 20);

    qcow2_create_options copts;
    MUST(qcow2_create_options_init(&copts));
    CHECK(copts.cluster_size == 65536);
    CHECK(copts.refcount_bits == 16);
    CHECK(copts.compat == QCOW2_COMPAT_V3);
    CHECK(copts.backing_file == NULL);
    MUST(qcow2_create(path, size, &copts));

    qcow2_image *img = NULL;
    MUST(qcow2_open(path, 0, &img));
    CHECK(img != NULL);

    qcow2_image_info info;
    MUST(qcow2_info(img, &info));
    CHECK(info.virtual_size == size);
    CHECK(info.cluster_size == 65536);
    CHECK(info.compat == QCOW2_COMPAT_V3);
    CHECK(info.refcount_bits == 16);
    CHECK(info.compression_type == QCOW2_COMPRESSION_ZLIB);
    CHECK(info.crypt_method == QCOW2_CRYPT_NONE);
    CHECK(!info.read_only && !info.corrupt && !info.has_backing_file && !info.extended_l2);
    const uint64_t cs = info.cluster_size;

    uint8_t *shadow = xcalloc(grown);

    /* A fresh image reads as zeros. */
    verify(img, shadow, 0, 1 << 20);

    /* Patterns at unaligned offsets: inside a sector, across sectors, clusters, L2 ranges. */
    static const struct {
        uint64_t off;
        size_t len;
    } writes[] = {
        {0, 1},           {1, 510},          {511, 2},         {4095, 4097},
        {65535, 2},       {3 * 65536 - 7, 200000}, {1000000, 65536}, {(8u << 20) - 3, 7},
        {(16u << 20) - 1000, 1000}, {12345, 1}, {70000, 131072 + 5},
    };
    for (size_t i = 0; i < sizeof writes / sizeof writes[0]; i++)
        write_both(img, shadow, writes[i].off, writes[i].len, (uint32_t)i + 1);
    for (size_t i = 0; i < sizeof writes / sizeof writes[0]; i++)
        verify(img, shadow, writes[i].off, writes[i].len);
    verify(img, shadow, 0, size);

    /* Overwrite in place, partially. */
    write_both(img, shadow, 4000, 300, 99);
    verify(img, shadow, 0, 2 << 20);

    /* Zero-length I/O is fine, even with NULL buffers. */
    MUST(qcow2_write(img, 5, NULL, 0));
    MUST(qcow2_read(img, 5, NULL, 0));

    /* write_zeroes over an unaligned range covering written data. */
    MUST(qcow2_write_zeroes(img, 100000, 300001));
    memset(shadow + 100000, 0, 300001);
    verify(img, shadow, 0, 1 << 20);

    /* discard: whole clusters inside the range read as zeros; partial ones are left alone. */
    write_both(img, shadow, 5 * cs, 6 * cs, 500);
    uint64_t d_off = 5 * cs + 100, d_len = 4 * cs + 50;
    MUST(qcow2_discard(img, d_off, d_len));
    uint64_t d_start = (d_off + cs - 1) / cs * cs, d_end = (d_off + d_len) / cs * cs;
    memset(shadow + d_start, 0, d_end - d_start);
    verify(img, shadow, 4 * cs, 8 * cs);

    /* A compressed cluster (unallocated target, cluster-aligned) reads back and maps as such. */
    const uint64_t c_off = 12u << 20;
    uint8_t *cbuf = xcalloc(cs);
    for (uint64_t i = 0; i < cs; i++) cbuf[i] = (uint8_t)("compressible "[i % 13]);
    MUST(qcow2_write_compressed(img, c_off, cbuf, cs));
    memcpy(shadow + c_off, cbuf, cs);
    free(cbuf);
    verify(img, shadow, c_off - 100, cs + 200);
    qcow2_map_entry centry;
    size_t ccount = 0;
    MUST(qcow2_map(img, c_off, cs, &centry, 1, &ccount));
    CHECK(ccount == 1 && centry.start == c_off && centry.length == cs);
    CHECK(centry.compressed && centry.data && !centry.has_offset);
    EXPECT_ERR(qcow2_write_compressed(img, c_off + 512, shadow, 512), QCOW2_ERR_INVALID_ARGUMENT);

    /* flush; a second flush with nothing new costs no sync. */
    MUST(qcow2_flush(img));
    uint64_t syncs1 = 0, syncs2 = 0;
    MUST(qcow2_sync_count(img, &syncs1));
    MUST(qcow2_flush(img));
    MUST(qcow2_sync_count(img, &syncs2));
    CHECK(syncs1 > 0);
    CHECK(syncs2 == syncs1);
    printf("fdatasyncs after first flush: %llu\n", (unsigned long long)syncs1);

    /* Reading or writing past the end fails cleanly, and the handle keeps working. */
    uint8_t tail[20];
    EXPECT_ERR(qcow2_read(img, size - 10, tail, sizeof tail), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(last_message()[0] != '\0');
    EXPECT_ERR(qcow2_write(img, size - 10, tail, sizeof tail), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_read(img, UINT64_MAX - 5, tail, sizeof tail), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_write(img, 0, NULL, 10), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(last_message(), "buf") != NULL);
    verify(img, shadow, size - 1000, 1000);

    /* Resize up; the new tail reads as zeros and is writable. */
    MUST(qcow2_resize(img, grown));
    uint64_t vs = 0;
    MUST(qcow2_virtual_size(img, &vs));
    CHECK(vs == grown);
    verify(img, shadow, size - 4096, grown - size + 4096);
    write_both(img, shadow, grown - 777, 777, 600);
    verify(img, shadow, size - 4096, grown - size + 4096);

    /* Strings: length query, too-small buffer (nothing written), exact fit. */
    size_t name_len = 0, n = 12345;
    MUST(qcow2_filename(img, NULL, 0, &name_len));
    CHECK(name_len == strlen(path));
    char *name = xcalloc(name_len + 1);
    memset(name, 'x', name_len);
    EXPECT_ERR(qcow2_filename(img, name, name_len, &n), QCOW2_ERR_BUFFER_TOO_SMALL);
    CHECK(n == 12345 && name[0] == 'x');
    MUST(qcow2_filename(img, name, name_len + 1, &n));
    CHECK(n == name_len && strcmp(name, path) == 0);
    free(name);
    char backing[16];
    MUST(qcow2_backing_file(img, backing, sizeof backing, &n));
    CHECK(n == 0 && backing[0] == '\0');

    /* map: extents follow each other from 0 to the end; a small array continues where it stopped. */
    qcow2_map_entry entries[4];
    uint64_t pos = 0;
    int calls = 0, data_extents = 0;
    while (pos < grown && calls < 1000) {
        size_t count = 0;
        MUST(qcow2_map(img, pos, grown - pos, entries, 4, &count));
        CHECK(count > 0 && count <= 4);
        if (count == 0) break;
        for (size_t i = 0; i < count; i++) {
            CHECK(entries[i].start == pos);
            CHECK(entries[i].length > 0);
            if (entries[i].data) {
                data_extents++;
                CHECK(entries[i].depth == 0);
                CHECK(entries[i].has_offset != entries[i].compressed);
            }
            pos = entries[i].start + entries[i].length;
        }
        calls++;
    }
    CHECK(pos == grown);
    CHECK(data_extents > 0);
    printf("map: %d calls of up to 4 extents, %d data extents\n", calls, data_extents);
    EXPECT_ERR(qcow2_map(img, 0, grown, entries, 0, &(size_t){0}), QCOW2_ERR_INVALID_ARGUMENT);

    /* check: clean. */
    qcow2_check_report report;
    MUST(qcow2_check(img, QCOW2_REPAIR_NONE, &report));
    CHECK(report.exit_code == 0);
    CHECK(report.corruptions == 0 && report.leaks == 0);
    CHECK(report.allocated_clusters > 0);
    CHECK(report.compressed_clusters == 1);
    EXPECT_ERR(qcow2_check(img, 17, &report), QCOW2_ERR_INVALID_ARGUMENT);

    /* A second user of the same image is refused with QCOW2_ERR_LOCKED (errno EAGAIN, the file
     * named), read-write or read-only, as QEMU refuses it; with QCOW2_OPEN_FORCE_SHARE a
     * read-only open shares it. */
    qcow2_image *second = NULL;
    EXPECT_ERR(qcow2_open(path, 0, &second), QCOW2_ERR_LOCKED);
    CHECK(second == NULL);
    CHECK(qcow2_last_errno() == EAGAIN);
    CHECK(strstr(last_message(), path) != NULL);
    CHECK(strstr(last_message(), "Failed to get \"write\" lock") != NULL);
    EXPECT_ERR(qcow2_open(path, QCOW2_OPEN_RDONLY, &second), QCOW2_ERR_LOCKED);
    CHECK(strstr(last_message(), "Failed to get shared \"write\" lock") != NULL);
    /* qemu-img too refuses, and shares with -U. */
    CHECK(run("qemu-img info '%s' >/dev/null 2>&1", path) != 0);
    CHECK(run("qemu-img info -U '%s' >/dev/null", path) == 0);
    EXPECT_ERR(qcow2_open(path, QCOW2_OPEN_FORCE_SHARE, &second), QCOW2_ERR_INVALID_ARGUMENT);
    MUST(qcow2_open(path, QCOW2_OPEN_RDONLY | QCOW2_OPEN_FORCE_SHARE, &second));
    MUST(qcow2_flush(img));
    {
        qcow2_image_info shared_info;
        MUST(qcow2_info(second, &shared_info));
        CHECK(shared_info.read_only);
    }
    MUST(qcow2_close(second));

    MUST(qcow2_close(img));

    /* Read-only open: reads work, writes fail with READ_ONLY. */
    MUST(qcow2_open(path, QCOW2_OPEN_RDONLY, &img));
    MUST(qcow2_info(img, &info));
    CHECK(info.read_only);
    verify(img, shadow, 0, grown);
    EXPECT_ERR(qcow2_write(img, 0, shadow, 512), QCOW2_ERR_READ_ONLY);
    CHECK(qcow2_last_errno() == EROFS);
    CHECK(strstr(last_message(), path) != NULL);
    MUST(qcow2_close(img));

    /* qemu-img agrees: the image is clean and holds the same data as a raw file. */
    write_raw(raw, shadow, grown);
    CHECK(run("qemu-img check -q '%s'", path) == 0);
    CHECK(run("qemu-img compare -q -f qcow2 -F raw '%s' '%s'", path, raw) == 0);

    free(shadow);
    free(raw);
    free(path);
}

/* v2 image with small clusters as backing file of a v3 overlay with extended L2 entries. */
static void test_backing_chain(const char *dir) {
    char *base = path_in(dir, "base.qcow2");
    char *top = path_in(dir, "top.qcow2");
    char *raw = path_in(dir, "top.raw");
    const uint64_t size = 4u << 20;
    uint8_t *shadow = xcalloc(size);

    qcow2_create_options opts;
    MUST(qcow2_create_options_init(&opts));
    opts.compat = QCOW2_COMPAT_V2;
    opts.cluster_size = 4096;
    MUST(qcow2_create(base, size, &opts));
    qcow2_image *img = NULL;
    MUST(qcow2_open(base, 0, &img));
    write_both(img, shadow, 0, size / 2, 7);
    write_both(img, shadow, size - 5000, 5000, 8);
    qcow2_image_info info;
    MUST(qcow2_info(img, &info));
    CHECK(info.compat == QCOW2_COMPAT_V2 && info.cluster_size == 4096);
    MUST(qcow2_close(img));

    MUST(qcow2_create_options_init(&opts));
    opts.backing_file = "base.qcow2"; /* relative to the overlay's directory */
    opts.backing_format = "qcow2";
    opts.extended_l2 = true;
    opts.cluster_size = 32768;
    MUST(qcow2_create(top, size, &opts));

    MUST(qcow2_open(top, 0, &img));
    MUST(qcow2_info(img, &info));
    CHECK(info.has_backing_file && info.extended_l2 && info.cluster_size == 32768);
    char name[4096];
    size_t n = 0;
    MUST(qcow2_backing_file(img, name, sizeof name, &n));
    CHECK(strcmp(name, "base.qcow2") == 0 && n == strlen("base.qcow2"));
    MUST(qcow2_backing_format(img, name, sizeof name, &n));
    CHECK(strcmp(name, "qcow2") == 0);
    MUST(qcow2_full_backing_filename(img, name, sizeof name, &n));
    CHECK(n == strlen(name) && n >= strlen("/base.qcow2"));
    CHECK(strcmp(name + n - strlen("/base.qcow2"), "/base.qcow2") == 0);
    verify(img, shadow, 0, size);
    /* Partial-cluster writes copy the rest of the cluster from the backing file. */
    write_both(img, shadow, 100, 1000, 9);
    write_both(img, shadow, size / 2 - 300, 600, 10);
    MUST(qcow2_write_zeroes(img, 40000, 70000));
    memset(shadow + 40000, 0, 70000);
    verify(img, shadow, 0, size);
    MUST(qcow2_close(img));

    /* Without the backing chain, unallocated clusters read as zeros. */
    qcow2_open_options oo;
    MUST(qcow2_open_options_init(&oo));
    CHECK(oo.flags == 0 && oo.cache_mode == QCOW2_CACHE_WRITEBACK && oo.l2_cache_size == 0);
    oo.flags = QCOW2_OPEN_RDONLY | QCOW2_OPEN_NO_BACKING;
    oo.cache_mode = QCOW2_CACHE_WRITETHROUGH;
    oo.l2_cache_size = 65536;
    MUST(qcow2_open_ex(top, &oo, &img));
    uint8_t buf[512];
    MUST(qcow2_read(img, size - 512, buf, sizeof buf));
    CHECK(buf[0] == 0 && buf[511] == 0);
    MUST(qcow2_close(img));
    oo.cache_mode = 99;
    EXPECT_ERR(qcow2_open_ex(top, &oo, &img), QCOW2_ERR_INVALID_ARGUMENT);

    /* The backing policy: the same overlay, with its backing file inside or outside the
     * allowed directories. */
    MUST(qcow2_open_options_init(&oo));
    CHECK(oo.backing_policy == QCOW2_BACKING_ANY && oo.backing_allow == NULL);
    oo.flags = QCOW2_OPEN_RDONLY;
    oo.backing_policy = QCOW2_BACKING_NONE;
    MUST(qcow2_open_ex(top, &oo, &img));
    MUST(qcow2_read(img, size - 512, buf, sizeof buf));
    CHECK(buf[0] == 0 && buf[511] == 0);
    MUST(qcow2_close(img));
    const char *elsewhere[] = {"/usr"};
    oo.backing_policy = QCOW2_BACKING_ALLOW;
    oo.backing_allow = elsewhere;
    oo.backing_allow_len = 1;
    EXPECT_ERR(qcow2_open_ex(top, &oo, &img), QCOW2_ERR_IO);
    CHECK(qcow2_last_errno() == 13); /* EACCES */
    char msg[1024];
    qcow2_last_error_message(msg, sizeof msg);
    CHECK(strstr(msg, "Could not open backing file") && strstr(msg, "base.qcow2") &&
          strstr(msg, "/usr"));
    const char *here[] = {"/usr", dir};
    oo.backing_allow = here;
    oo.backing_allow_len = 2;
    MUST(qcow2_open_ex(top, &oo, &img));
    verify(img, shadow, 0, size);
    MUST(qcow2_close(img));
    oo.backing_policy = QCOW2_BACKING_ANY; /* a list with another policy is a mistake */
    EXPECT_ERR(qcow2_open_ex(top, &oo, &img), QCOW2_ERR_INVALID_ARGUMENT);
    oo.backing_policy = 7;
    EXPECT_ERR(qcow2_open_ex(top, &oo, &img), QCOW2_ERR_INVALID_ARGUMENT);
    /* A damaged image opens read-only only; a whole one opens as damaged like any other. */
    MUST(qcow2_open_options_init(&oo));
    oo.flags = QCOW2_OPEN_DAMAGED;
    EXPECT_ERR(qcow2_open_ex(top, &oo, &img), QCOW2_ERR_INVALID_ARGUMENT);
    oo.flags = QCOW2_OPEN_DAMAGED | QCOW2_OPEN_RDONLY;
    MUST(qcow2_open_ex(top, &oo, &img));
    verify(img, shadow, 0, size);
    MUST(qcow2_close(img));

    write_raw(raw, shadow, size);
    CHECK(run("qemu-img check -q '%s'", base) == 0);
    CHECK(run("qemu-img check -q '%s'", top) == 0);
    CHECK(run("qemu-img compare -q -f qcow2 -F raw '%s' '%s'", top, raw) == 0);

    free(shadow);
    free(raw);
    free(top);
    free(base);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    printf("libqcow2rs %s\n", qcow2_version());
    test_error_reporting(argv[1]);
    test_main_image(argv[1]);
    test_backing_chain(argv[1]);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C API checks passed\n");
    return 0;
}

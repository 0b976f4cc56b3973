/*
 * Internal snapshots through the C API: create (default and explicit options), list with the
 * length-query / buffer pattern, apply by ID and by name (an ID wins over a name, the virtual
 * size follows the snapshot), delete, read-only snapshot views (qcow2_open_options.snapshot),
 * and the errors (QCOW2_ERR_NOT_FOUND with ENOENT, BUFFER_TOO_SMALL writing nothing, READ_ONLY,
 * INVALID_ARGUMENT). Then qemu-img agrees: `snapshot -l` lists what we created, `convert -l`
 * extracts what each snapshot held, `check` is clean, and the reverse: a snapshot made and
 * applied by qemu-img is listed and applied here.
 *
 * Usage: test_snapshots DIR   (DIR: an empty scratch directory)
 */
#define _POSIX_C_SOURCE 200809L

#include "qcow2rs.h"
#include "check.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MIB (1u << 20)
#define SIZE (4 * MIB)
#define GROWN (6 * MIB)

/* A snapshot as listed: strings in fixed buffers (the test's names are short). */
struct listed {
    char id[QCOW2_SNAPSHOT_ID_SIZE];
    char name[64];
    qcow2_snapshot_info info;
};

static void fill(uint8_t *buf, size_t len, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < len; i++) {
        x = x * 1103515245u + 12345u;
        buf[i] = (uint8_t)(x >> 16);
    }
}

/* Write `len` bytes of pattern `seed` at `off`, in the image and in the shadow copy. */
static void write_both(qcow2_image *img, uint8_t *shadow, uint64_t off, size_t len, uint32_t seed) {
    uint8_t *buf = xcalloc(len);
    fill(buf, len, seed);
    MUST(qcow2_write(img, off, buf, len));
    memcpy(shadow + off, buf, len);
    free(buf);
}

/* The whole disk must read as `shadow` (of `size` bytes), and the disk be `size` bytes. */
static void verify(const qcow2_image *img, const uint8_t *shadow, uint64_t size, const char *what) {
    uint64_t vs = 0;
    MUST(qcow2_virtual_size(img, &vs));
    if (vs != size) {
        fprintf(stderr, "%s: virtual size %llu, want %llu\n", what, (unsigned long long)vs,
                (unsigned long long)size);
        failures++;
        return;
    }
    uint8_t *buf = xcalloc(size);
    MUST(qcow2_read(img, 0, buf, size));
    if (memcmp(buf, shadow, size) != 0) {
        size_t i = 0;
        while (buf[i] == shadow[i]) i++;
        fprintf(stderr, "%s: data differs at guest offset %zu\n", what, i);
        failures++;
    }
    free(buf);
}

static void write_file(const char *path, const uint8_t *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

/* The contents of a small text file, malloc'ed and NUL-terminated. */
static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(1);
    }
    size_t cap = 1 << 16, n = 0;
    char *s = xcalloc(cap);
    n = fread(s, 1, cap - 1, f);
    s[n] = '\0';
    fclose(f);
    return s;
}

/* List every snapshot: lengths first (NULL buffers), then the strings. Returns the count. */
static size_t list_all(const qcow2_image *img, struct listed *out, size_t max) {
    size_t n = 0;
    MUST(qcow2_snapshot_count(img, &n));
    CHECK(n <= max);
    for (size_t i = 0; i < n && i < max; i++) {
        qcow2_snapshot_info lens;
        MUST(qcow2_snapshot_get(img, i, NULL, 0, NULL, 0, &lens));
        CHECK(lens.id_len < sizeof out[i].id && lens.name_len < sizeof out[i].name);
        MUST(qcow2_snapshot_get(img, i, out[i].id, sizeof out[i].id, out[i].name,
                                sizeof out[i].name, &out[i].info));
        CHECK(strlen(out[i].id) == lens.id_len && out[i].info.id_len == lens.id_len);
        CHECK(strlen(out[i].name) == lens.name_len && out[i].info.name_len == lens.name_len);
    }
    return n;
}

/* The line of `qemu-img snapshot -l` output `listing` for snapshot ID `id`, or NULL; copied
 * into `line`. */
static const char *listing_line(const char *listing, const char *id, char *line, size_t cap) {
    const char *p = listing;
    while (p && *p) {
        const char *end = strchr(p, '\n');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        size_t idlen = strlen(id);
        if (len > idlen && strncmp(p, id, idlen) == 0 && p[idlen] == ' ') {
            if (len >= cap) len = cap - 1;
            memcpy(line, p, len);
            line[len] = '\0';
            return line;
        }
        p = end ? end + 1 : NULL;
    }
    return NULL;
}

static void test_snapshots(const char *dir) {
    char *path = path_in(dir, "snap.qcow2");
    char *raw = path_in(dir, "expected.raw");
    char *listing_path = path_in(dir, "listing.txt");
    uint8_t *shadow = xcalloc(GROWN);   /* the active disk */
    uint8_t *at_base = xcalloc(GROWN);  /* what snapshot 1 ("base") holds */
    uint8_t *at_second = xcalloc(GROWN); /* snapshot 2 ("second") */
    uint8_t *at_grown = xcalloc(GROWN); /* snapshot 3 (named "1"), 6 MiB */

    qcow2_create_options copts;
    MUST(qcow2_create_options_init(&copts));
    copts.cluster_size = 65536;
    MUST(qcow2_create(path, SIZE, &copts));
    qcow2_image *img = NULL;
    MUST(qcow2_open(path, 0, &img));

    /* No snapshots yet: index 0 is not found (ENOENT), and nothing is written. */
    size_t count = 99;
    MUST(qcow2_snapshot_count(img, &count));
    CHECK(count == 0);
    qcow2_snapshot_info info;
    memset(&info, 0xab, sizeof info);
    char idbuf[QCOW2_SNAPSHOT_ID_SIZE] = "untouched";
    EXPECT_ERR(qcow2_snapshot_get(img, 0, idbuf, sizeof idbuf, NULL, 0, &info),
               QCOW2_ERR_NOT_FOUND);
    CHECK(qcow2_last_errno() == ENOENT);
    CHECK(strstr(last_message(), "index 0") != NULL);
    CHECK(strcmp(idbuf, "untouched") == 0 && info.id_len == (size_t)0xabababababababab);

    /* Snapshot 1 "base", with the defaults of qemu-img snapshot -c. */
    write_both(img, shadow, 0, 3 * 65536 + 5, 1);
    write_both(img, shadow, 2 * MIB - 100, 300, 2);
    write_both(img, shadow, SIZE - 4096, 4096, 3);
    time_t before = time(NULL);
    memset(&info, 0, sizeof info);
    MUST(qcow2_snapshot_create(img, "base", NULL, idbuf, sizeof idbuf, &info));
    time_t after = time(NULL);
    memcpy(at_base, shadow, SIZE);
    CHECK(strcmp(idbuf, "1") == 0);
    CHECK(info.id_len == 1 && info.name_len == 4);
    CHECK(info.disk_size == SIZE && info.vm_state_size == 0 && info.vm_clock_nsec == 0);
    CHECK(info.has_icount && info.icount == 0);
    CHECK((time_t)info.date_sec >= before - 1 && (time_t)info.date_sec <= after + 1);
    CHECK(info.date_nsec < 1000000000u);

    /* Writes after it copy on write; snapshot 2 "second" with explicit options, no out. */
    write_both(img, shadow, 65536 + 17, 70000, 4);
    write_both(img, shadow, 3 * MIB, 65536, 5);
    MUST(qcow2_write_zeroes(img, SIZE - 4096, 4096));
    memset(shadow + SIZE - 4096, 0, 4096);
    qcow2_snapshot_options sopts;
    MUST(qcow2_snapshot_options_init(&sopts));
    CHECK(!sopts.has_date && sopts.vm_clock_nsec == 0 && sopts.has_icount && sopts.icount == 0);
    sopts.has_date = true;
    sopts.date_sec = 1700000000;
    sopts.date_nsec = 123456789;
    sopts.vm_clock_nsec = 5000000000ull;
    sopts.has_icount = false;
    MUST(qcow2_snapshot_create(img, "second", &sopts, NULL, 0, NULL));
    memcpy(at_second, shadow, SIZE);

    /* A too-small ID buffer is refused before anything is created. */
    char small[8];
    EXPECT_ERR(qcow2_snapshot_create(img, "never", NULL, small, sizeof small, NULL),
               QCOW2_ERR_BUFFER_TOO_SMALL);
    CHECK(strstr(last_message(), "QCOW2_SNAPSHOT_ID_SIZE") != NULL);
    MUST(qcow2_snapshot_count(img, &count));
    CHECK(count == 2);

    /* Grow the disk, then snapshot 3, named "1" (the ID of snapshot 1). */
    MUST(qcow2_resize(img, GROWN));
    write_both(img, shadow, GROWN - 10000, 10000, 6);
    MUST(qcow2_snapshot_create(img, "1", NULL, idbuf, sizeof idbuf, &info));
    CHECK(strcmp(idbuf, "3") == 0 && info.disk_size == GROWN);
    memcpy(at_grown, shadow, GROWN);

    /* The list, in table order. */
    struct listed l[8];
    size_t n = list_all(img, l, 8);
    CHECK(n == 3);
    CHECK(strcmp(l[0].id, "1") == 0 && strcmp(l[0].name, "base") == 0);
    CHECK(strcmp(l[1].id, "2") == 0 && strcmp(l[1].name, "second") == 0);
    CHECK(strcmp(l[2].id, "3") == 0 && strcmp(l[2].name, "1") == 0);
    CHECK(l[0].info.disk_size == SIZE && l[0].info.has_icount && l[0].info.icount == 0);
    CHECK(l[1].info.date_sec == 1700000000u && l[1].info.date_nsec == 123456789u);
    CHECK(l[1].info.vm_clock_nsec == 5000000000ull && !l[1].info.has_icount);
    CHECK(l[1].info.disk_size == SIZE && l[1].info.vm_state_size == 0);
    CHECK(l[2].info.disk_size == GROWN);
    qcow2_image_info ii;
    MUST(qcow2_info(img, &ii));
    CHECK(ii.snapshot_count == 3);

    /* A buffer one byte short (no room for the NUL): BUFFER_TOO_SMALL, nothing written. */
    char name6[6] = "xxxxx";
    memset(&info, 0xab, sizeof info);
    EXPECT_ERR(qcow2_snapshot_get(img, 1, idbuf, sizeof idbuf, name6, sizeof name6, &info),
               QCOW2_ERR_BUFFER_TOO_SMALL);
    CHECK(strcmp(name6, "xxxxx") == 0 && info.id_len == (size_t)0xabababababababab);
    EXPECT_ERR(qcow2_snapshot_get(img, 3, NULL, 0, NULL, 0, &info), QCOW2_ERR_NOT_FOUND);
    EXPECT_ERR(qcow2_snapshot_get(img, 0, NULL, 5, NULL, 0, &info), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_snapshot_get(img, 0, NULL, 0, NULL, 0, NULL), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_snapshot_get(NULL, 0, NULL, 0, NULL, 0, &info), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_snapshot_count(img, NULL), QCOW2_ERR_INVALID_ARGUMENT);

    /* The active disk is not a view. */
    EXPECT_ERR(qcow2_snapshot_view(img, NULL, 0, NULL, 0, &info), QCOW2_ERR_NOT_FOUND);

    /* Apply by name: the disk shrinks back to the snapshot's 4 MiB and holds its data. */
    write_both(img, shadow, 0, 1000, 7); /* lost by the apply */
    MUST(qcow2_snapshot_apply(img, "second"));
    verify(img, at_second, SIZE, "after applying 'second'");
    /* "1" is an ID before it is a name: snapshot 1 ("base"), not snapshot 3 (named "1"). */
    MUST(qcow2_snapshot_apply(img, "1"));
    verify(img, at_base, SIZE, "after applying '1'");
    /* By ID: snapshot 3 grows the disk to 6 MiB again. */
    MUST(qcow2_snapshot_apply(img, "3"));
    verify(img, at_grown, GROWN, "after applying '3'");
    memcpy(shadow, at_grown, GROWN);
    /* Writes after an apply leave the snapshot alone. */
    write_both(img, shadow, 100, 200000, 8);
    MUST(qcow2_snapshot_count(img, &count));
    CHECK(count == 3);

    /* Not found: apply and delete name what is not there; nothing changes. */
    EXPECT_ERR(qcow2_snapshot_apply(img, "no-such-snapshot"), QCOW2_ERR_NOT_FOUND);
    CHECK(qcow2_last_errno() == ENOENT);
    CHECK(strstr(last_message(), "no-such-snapshot") != NULL);
    CHECK(strstr(last_message(), path) != NULL);
    EXPECT_ERR(qcow2_snapshot_delete(img, "4"), QCOW2_ERR_NOT_FOUND);
    verify(img, shadow, GROWN, "after failed apply");
    /* Bad arguments. */
    EXPECT_ERR(qcow2_snapshot_create(img, NULL, NULL, NULL, 0, NULL), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(last_message(), "name") != NULL);
    EXPECT_ERR(qcow2_snapshot_create(img, "\xff\xfe", NULL, NULL, 0, NULL),
               QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_snapshot_apply(img, NULL), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_snapshot_delete(NULL, "1"), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_snapshot_options_init(NULL), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(qcow2_strerror(QCOW2_ERR_NOT_FOUND), "not found") == 0);

    /* Delete by name; snapshot 2 is gone, the others stay. */
    MUST(qcow2_snapshot_delete(img, "second"));
    n = list_all(img, l, 8);
    CHECK(n == 2 && strcmp(l[0].id, "1") == 0 && strcmp(l[1].id, "3") == 0);
    EXPECT_ERR(qcow2_snapshot_apply(img, "2"), QCOW2_ERR_NOT_FOUND);
    verify(img, shadow, GROWN, "after delete");

    qcow2_check_report report;
    MUST(qcow2_check(img, QCOW2_REPAIR_NONE, &report));
    CHECK(report.exit_code == 0 && report.corruptions == 0 && report.leaks == 0);
    MUST(qcow2_close(img));

    /* Snapshot views: read-only, the snapshot's data and size. */
    qcow2_open_options oo;
    MUST(qcow2_open_options_init(&oo));
    CHECK(oo.snapshot == NULL);
    oo.flags = QCOW2_OPEN_RDONLY;
    oo.snapshot = "base";
    MUST(qcow2_open_ex(path, &oo, &img));
    verify(img, at_base, SIZE, "view of 'base'");
    char vname[64];
    memset(&info, 0, sizeof info);
    MUST(qcow2_snapshot_view(img, idbuf, sizeof idbuf, vname, sizeof vname, &info));
    CHECK(strcmp(idbuf, "1") == 0 && strcmp(vname, "base") == 0 && info.disk_size == SIZE);
    MUST(qcow2_info(img, &ii));
    CHECK(ii.read_only && ii.virtual_size == SIZE);
    EXPECT_ERR(qcow2_write(img, 0, shadow, 512), QCOW2_ERR_READ_ONLY);
    EXPECT_ERR(qcow2_snapshot_create(img, "on-a-view", NULL, NULL, 0, NULL), QCOW2_ERR_READ_ONLY);
    EXPECT_ERR(qcow2_snapshot_delete(img, "1"), QCOW2_ERR_READ_ONLY);
    MUST(qcow2_close(img));
    oo.snapshot = "3"; /* by ID */
    MUST(qcow2_open_ex(path, &oo, &img));
    verify(img, at_grown, GROWN, "view of ID 3");
    MUST(qcow2_snapshot_view(img, idbuf, sizeof idbuf, NULL, 0, &info));
    CHECK(strcmp(idbuf, "3") == 0 && info.name_len == 1);
    MUST(qcow2_close(img));
    /* A view needs read-only; a missing snapshot is NOT_FOUND; the handle stays untouched. */
    qcow2_image *untouched = (qcow2_image *)(uintptr_t)0x1;
    oo.snapshot = "no-such-snapshot";
    EXPECT_ERR(qcow2_open_ex(path, &oo, &untouched), QCOW2_ERR_NOT_FOUND);
    CHECK(qcow2_last_errno() == ENOENT);
    CHECK(untouched == (qcow2_image *)(uintptr_t)0x1);
    oo.flags = 0;
    oo.snapshot = "base";
    EXPECT_ERR(qcow2_open_ex(path, &oo, &untouched), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(untouched == (qcow2_image *)(uintptr_t)0x1);
    oo.flags = QCOW2_OPEN_RDONLY;
    oo.snapshot = "\xff";
    EXPECT_ERR(qcow2_open_ex(path, &oo, &untouched), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(last_message(), "opts->snapshot") != NULL);

    /* Read-only: no changes to snapshots. */
    MUST(qcow2_open(path, QCOW2_OPEN_RDONLY, &img));
    EXPECT_ERR(qcow2_snapshot_create(img, "ro", NULL, NULL, 0, NULL), QCOW2_ERR_READ_ONLY);
    EXPECT_ERR(qcow2_snapshot_apply(img, "1"), QCOW2_ERR_READ_ONLY);
    EXPECT_ERR(qcow2_snapshot_delete(img, "1"), QCOW2_ERR_READ_ONLY);
    MUST(qcow2_close(img));

    /* qemu-img agrees: the image is clean, the listing is ours, each snapshot holds its data. */
    CHECK(run("qemu-img check -q '%s'", path) == 0);
    CHECK(run("TZ=UTC qemu-img snapshot -l '%s' > '%s'", path, listing_path) == 0);
    char *listing = read_file(listing_path);
    char line[512];
    CHECK(listing_line(listing, "1", line, sizeof line) != NULL);
    CHECK(strstr(line, " base ") != NULL);
    CHECK(strlen(line) >= 2 && strcmp(line + strlen(line) - 2, " 0") == 0); /* icount 0 */
    CHECK(listing_line(listing, "3", line, sizeof line) != NULL);
    CHECK(strncmp(line, "3 ", 2) == 0 && strstr(line + 1, " 1 ") != NULL);
    CHECK(listing_line(listing, "2", line, sizeof line) == NULL);
    free(listing);
    write_file(raw, at_base, SIZE);
    /* (qemu-img convert -l writes the active disk's size: compare the snapshot's 4 MiB.) */
    CHECK(run("qemu-img convert -l snapshot.id=1 -O raw '%s' '%s/base-by-qemu.raw' && "
              "cmp -s -n %u '%s/base-by-qemu.raw' '%s'",
              path, dir, SIZE, dir, raw) == 0);
    write_file(raw, shadow, GROWN);
    CHECK(run("qemu-img compare -q -f qcow2 -F raw '%s' '%s'", path, raw) == 0);

    /* The explicit options are what qemu-img shows: date, VM clock, no icount. */
    MUST(qcow2_open(path, 0, &img));
    MUST(qcow2_snapshot_create(img, "opts", &sopts, idbuf, sizeof idbuf, NULL));
    CHECK(strcmp(idbuf, "4") == 0); /* the highest ID plus one, though 2 is free */
    MUST(qcow2_close(img));
    CHECK(run("TZ=UTC qemu-img snapshot -l '%s' > '%s'", path, listing_path) == 0);
    listing = read_file(listing_path);
    CHECK(listing_line(listing, "4", line, sizeof line) != NULL);
    CHECK(strstr(line, " opts ") != NULL);
    CHECK(strstr(line, "2023-11-14 22:13:20") != NULL);
    CHECK(strstr(line, "00:00:05.000") != NULL);
    /* No icount: qemu-img shows "--" in the ICOUNT column (snapshot 1 shows 0). */
    size_t ll = strlen(line);
    while (ll > 0 && line[ll - 1] == ' ') ll--;
    CHECK(ll >= 3 && strncmp(line + ll - 3, " --", 3) == 0);
    free(listing);

    /* The reverse: qemu-img creates a snapshot, changes the disk, applies its own snapshot. */
    CHECK(run("qemu-img snapshot -c from-qemu '%s'", path) == 0);
    CHECK(run("qemu-img snapshot -a 1 '%s'", path) == 0);
    MUST(qcow2_open(path, 0, &img));
    verify(img, at_base, SIZE, "after qemu-img snapshot -a 1");
    n = list_all(img, l, 8);
    CHECK(n == 4 && strcmp(l[3].name, "from-qemu") == 0 && strcmp(l[3].id, "5") == 0);
    CHECK(l[3].info.disk_size == GROWN && l[3].info.has_icount);
    MUST(qcow2_snapshot_apply(img, "from-qemu"));
    verify(img, shadow, GROWN, "after applying qemu-img's snapshot");
    MUST(qcow2_snapshot_delete(img, "opts"));
    MUST(qcow2_snapshot_delete(img, "1")); /* ID 1 */
    MUST(qcow2_close(img));
    CHECK(run("qemu-img check -q '%s'", path) == 0);
    CHECK(run("qemu-img compare -q -f qcow2 -F raw '%s' '%s'", path, raw) == 0);
    CHECK(run("qemu-img snapshot -l '%s' > '%s'", path, listing_path) == 0);
    listing = read_file(listing_path);
    CHECK(listing_line(listing, "1", line, sizeof line) == NULL);
    CHECK(listing_line(listing, "4", line, sizeof line) == NULL);
    CHECK(listing_line(listing, "3", line, sizeof line) != NULL);
    CHECK(listing_line(listing, "5", line, sizeof line) != NULL);
    free(listing);

    free(at_grown);
    free(at_second);
    free(at_base);
    free(shadow);
    free(listing_path);
    free(raw);
    free(path);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    test_snapshots(argv[1]);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C snapshot checks passed\n");
    return 0;
}

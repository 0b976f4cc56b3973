/*
 * The rest of the C API and its error paths: version macros against the library, vectored I/O
 * (qcow2_readv/qcow2_writev with struct iovec), qcow2_encryption_info against qemu-img info,
 * qcow2_probe_format, creating an overlay without opening its backing file, a NULL for every
 * pointer parameter of every function, bad options, a password with a NUL byte inside, wrong
 * passwords, corrupt and truncated images, I/O past the end; outputs left untouched on failure.
 * What C writes is checked by qemu-img check and qemu-img compare against a raw reference.
 *
 * Usage: test_api DIR   (DIR: an empty scratch directory)
 */
#define _POSIX_C_SOURCE 200809L

#include "qcow2rs.h"
#include "check.h"

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>

#if !defined(QCOW2RS_VERSION_NUMBER) || QCOW2RS_VERSION_NUMBER < 0x000100
#error "QCOW2RS_VERSION_NUMBER must be usable in #if"
#endif

/* qcow2_iovec is struct iovec: an array of either may be passed. */
_Static_assert(sizeof(struct qcow2_iovec) == sizeof(struct iovec), "iovec size");
_Static_assert(offsetof(struct qcow2_iovec, base) == offsetof(struct iovec, iov_base), "base");
_Static_assert(offsetof(struct qcow2_iovec, len) == offsetof(struct iovec, iov_len), "len");

#define MIB (1u << 20)

static uint8_t pattern(uint64_t off, unsigned seed) {
    return (uint8_t)((off * 2654435761u >> 7) + seed);
}

/* The message of the last error names the function. */
static void expect_null(qcow2_error rc, const char *func, const char *param, int line) {
    if (rc != QCOW2_ERR_INVALID_ARGUMENT) {
        fprintf(stderr, "line %d: %s with NULL %s returned %d\n", line, func, param, (int)rc);
        failures++;
        return;
    }
    const char *msg = last_message();
    if (strstr(msg, func) == NULL || strstr(msg, param) == NULL || qcow2_last_errno() != EINVAL) {
        fprintf(stderr, "line %d: %s: message \"%s\" should name %s and %s (errno %d)\n", line,
                func, msg, func, param, qcow2_last_errno());
        failures++;
    }
}
#define NULL_ARG(call, func, param) expect_null((call), func, param, __LINE__)

static void test_version(void) {
    CHECK(strcmp(qcow2_version(), QCOW2RS_VERSION) == 0);
    CHECK(qcow2_version_number() == QCOW2RS_VERSION_NUMBER);
    CHECK(QCOW2RS_VERSION_NUMBER ==
          ((QCOW2RS_VERSION_MAJOR << 16) | (QCOW2RS_VERSION_MINOR << 8) | QCOW2RS_VERSION_PATCH));
    char want[64];
    snprintf(want, sizeof want, "%d.%d.%d", QCOW2RS_VERSION_MAJOR, QCOW2RS_VERSION_MINOR,
             QCOW2RS_VERSION_PATCH);
    CHECK(strcmp(want, QCOW2RS_VERSION) == 0);
}

/* Vectored I/O, with a raw file kept in step as the reference for qemu-img compare. */
static void test_vectored(const char *dir) {
    char *path = path_in(dir, "vec.qcow2");
    char *raw = path_in(dir, "vec.raw");
    const uint64_t size = 4 * MIB;
    struct qcow2_create_options c;
    MUST(qcow2_create_options_init(&c));
    c.cluster_size = 4096; /* many clusters per request */
    MUST(qcow2_create(path, size, &c));
    qcow2_image *img = NULL;
    MUST(qcow2_open(path, 0, &img));
    uint8_t *ref = xcalloc(size);

    /* Segments of every kind: 1 byte, unaligned, empty (even with a NULL base), one large
     * enough to go directly, and then 300 small ones (1.2 MB, more than one bounce buffer). */
    enum { NSEG = 306 };
    struct iovec iov[NSEG];
    size_t lens[NSEG] = {1, 100, 0, 4099, 128 * 1024, 0};
    for (int i = 6; i < NSEG; i++) lens[i] = 4000 + (size_t)(i % 7);
    uint64_t off = 12345;
    uint64_t at = off;
    for (int i = 0; i < NSEG; i++) {
        iov[i].iov_len = lens[i];
        iov[i].iov_base = lens[i] ? malloc(lens[i]) : (i == 2 ? NULL : (void *)ref);
        for (size_t j = 0; j < lens[i]; j++) {
            ((uint8_t *)iov[i].iov_base)[j] = pattern(at + j, 1);
            ref[at + j] = pattern(at + j, 1);
        }
        at += lens[i];
    }
    uint64_t total = at - off;
    MUST(qcow2_writev(img, off, (const struct qcow2_iovec *)iov, NSEG));

    uint8_t *back = xcalloc(size);
    MUST(qcow2_read(img, 0, back, size));
    CHECK(memcmp(back, ref, size) == 0);

    /* Read it back with a different split (reusing the buffers in reverse order of size). */
    for (int i = 0; i < NSEG; i++)
        if (lens[i]) memset(iov[i].iov_base, 0xee, lens[i]);
    MUST(qcow2_readv(img, off, (const struct qcow2_iovec *)iov, NSEG));
    at = off;
    for (int i = 0; i < NSEG; i++) {
        if (lens[i]) CHECK(memcmp(iov[i].iov_base, ref + at, lens[i]) == 0);
        at += lens[i];
    }
    struct qcow2_iovec two[2] = {{back, 70000}, {back + 70000, total - 70000}};
    memset(back, 0, size);
    MUST(qcow2_readv(img, off, two, 2));
    CHECK(memcmp(back, ref + off, total) == 0);

    /* Nothing at all, and zero-length vectors. */
    MUST(qcow2_readv(img, 0, NULL, 0));
    MUST(qcow2_writev(img, size, NULL, 0));
    struct qcow2_iovec empty[2] = {{NULL, 0}, {NULL, 0}};
    MUST(qcow2_writev(img, 7, empty, 2));

    /* Errors, checked before anything is read or written. */
    struct qcow2_iovec one = {back, 4096};
    memset(back, 0x77, 4096);
    NULL_ARG(qcow2_readv(NULL, 0, &one, 1), "qcow2_readv", "img");
    NULL_ARG(qcow2_writev(NULL, 0, &one, 1), "qcow2_writev", "img");
    NULL_ARG(qcow2_readv(img, 0, NULL, 1), "qcow2_readv", "iov");
    NULL_ARG(qcow2_writev(img, 0, NULL, 1), "qcow2_writev", "iov");
    struct qcow2_iovec holes[2] = {{back, 10}, {NULL, 10}};
    NULL_ARG(qcow2_writev(img, 0, holes, 2), "qcow2_writev", "iov[1].base");
    NULL_ARG(qcow2_readv(img, 0, holes, 2), "qcow2_readv", "iov[1].base");
    EXPECT_ERR(qcow2_readv(img, size - 4095, &one, 1), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(last_message(), path) != NULL);
    CHECK(strstr(last_message(), "past the end") != NULL);
    CHECK(back[0] == 0x77); /* nothing read */
    EXPECT_ERR(qcow2_writev(img, size - 4095, &one, 1), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_writev(img, UINT64_MAX, &one, 1), QCOW2_ERR_INVALID_ARGUMENT);
    struct qcow2_iovec huge[2] = {{back, SIZE_MAX / 2 + 1}, {back, SIZE_MAX / 2 + 1}};
    EXPECT_ERR(qcow2_writev(img, 0, huge, 2), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(last_message(), "too large") != NULL);
    MUST(qcow2_read(img, 0, back, size));
    CHECK(memcmp(back, ref, size) == 0); /* failed writes changed nothing */

    /* Past-the-end I/O for the other calls too. */
    EXPECT_ERR(qcow2_read(img, size - 1, back, 2), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_read(img, UINT64_MAX, back, 1), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_write(img, size, back, 1), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_write_zeroes(img, size - 512, 1024), QCOW2_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(qcow2_discard(img, UINT64_MAX - 10, 100), QCOW2_ERR_INVALID_ARGUMENT);
    struct qcow2_map_entry map[4];
    size_t n = 99;
    EXPECT_ERR(qcow2_map(img, size - 10, 11, map, 4, &n), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(n == 99);

    MUST(qcow2_close(img));

    /* A read-only handle refuses vectored writes, and still reads. */
    MUST(qcow2_open(path, QCOW2_OPEN_RDONLY, &img));
    EXPECT_ERR(qcow2_writev(img, 0, &one, 1), QCOW2_ERR_READ_ONLY);
    EXPECT_ERR(qcow2_writev(img, 0, empty, 2), QCOW2_ERR_READ_ONLY);
    MUST(qcow2_readv(img, off, two, 2));
    MUST(qcow2_close(img));

    FILE *f = fopen(raw, "wb");
    CHECK(f != NULL && fwrite(ref, 1, size, f) == size && fclose(f) == 0);
    CHECK(run("qemu-img check -q '%s'", path) == 0);
    CHECK(run("qemu-img compare -q -f qcow2 -F raw '%s' '%s'", path, raw) == 0);

    for (int i = 0; i < NSEG; i++)
        if (lens[i]) free(iov[i].iov_base);
    free(back);
    free(ref);
    free(path);
    free(raw);
}

static void test_encryption_info(const char *dir) {
    /* A password with a NUL byte inside: pointer + length, never a C string. */
    static const uint8_t PW[] = {'a', 0, 'b'};
    char *path = path_in(dir, "luks.qcow2");
    struct qcow2_create_options c;
    MUST(qcow2_create_options_init(&c));
    c.encrypt_format = QCOW2_ENCRYPT_LUKS;
    c.password = PW;
    c.password_len = sizeof PW;
    c.encrypt_cipher_alg = "aes-128";
    c.encrypt_cipher_mode = "cbc";
    c.encrypt_ivgen_alg = "essiv";
    c.encrypt_ivgen_hash_alg = "sha256";
    c.encrypt_hash_alg = "sha1";
    c.encrypt_iter_time_ms = 10;
    MUST(qcow2_create(path, MIB, &c));

    qcow2_error rc;
    qcow2_image *img = open_pw(path, PW, 1, 0, &rc); /* "a": the prefix before the NUL */
    EXPECT_ERR(rc, QCOW2_ERR_BAD_KEY);
    CHECK(img == NULL);
    CHECK(strstr(last_message(), path) != NULL);
    img = open_pw(path, "wrong", 5, 0, &rc);
    EXPECT_ERR(rc, QCOW2_ERR_BAD_KEY);
    img = open_pw(path, NULL, 0, 0, &rc);
    EXPECT_ERR(rc, QCOW2_ERR_BAD_KEY);
    img = open_pw(path, NULL, 3, 0, &rc);
    EXPECT_ERR(rc, QCOW2_ERR_INVALID_ARGUMENT);
    img = open_pw(path, PW, sizeof PW, 0, &rc);
    MUST(rc);

    struct qcow2_crypt_info e;
    MUST(qcow2_encryption_info(img, &e));
    CHECK(e.crypt_method == QCOW2_CRYPT_LUKS);
    CHECK(e.cipher_alg && strcmp(e.cipher_alg, "aes-128") == 0);
    CHECK(e.cipher_mode && strcmp(e.cipher_mode, "cbc") == 0);
    CHECK(e.ivgen_alg && strcmp(e.ivgen_alg, "essiv") == 0);
    CHECK(e.ivgen_hash_alg && strcmp(e.ivgen_hash_alg, "sha256") == 0);
    CHECK(e.hash_alg && strcmp(e.hash_alg, "sha1") == 0);
    CHECK(strlen(e.uuid) == 36);
    CHECK(e.payload_offset > 0 && e.master_key_iters > 0);
    CHECK(e.slots[0].active && e.slots[0].iters > 0 && e.slots[0].stripes == 4000);
    for (int i = 1; i < QCOW2_LUKS_SLOTS; i++) CHECK(!e.slots[i].active && e.slots[i].iters == 0);
    CHECK(e.slots[1].key_offset > e.slots[0].key_offset);

    /* A second key slot shows up at once. */
    int32_t slot = -1;
    MUST(qcow2_luks_add_key(img, (const uint8_t *)"second", 6, -1, 10, false, &slot));
    CHECK(slot == 1);
    MUST(qcow2_encryption_info(img, &e));
    CHECK(e.slots[1].active && e.slots[1].iters > 0);
    uint8_t data[4096];
    memset(data, 0x3c, sizeof data);
    MUST(qcow2_write(img, 8192, data, sizeof data));
    MUST(qcow2_close(img));

    /* qemu-img info sees the same header. */
    CHECK(run("qemu-img info --output=json '%s' | grep -q '\"uuid\": \"%s\"'", path, e.uuid) == 0);
    CHECK(run("qemu-img info --output=json '%s' | grep -q '\"payload-offset\": %llu'", path,
              (unsigned long long)e.payload_offset) == 0);
    CHECK(run("qemu-img info --output=json '%s' | grep -q '\"master-key-iters\": %u'", path,
              e.master_key_iters) == 0);
    CHECK(run("qemu-img info --output=json '%s' | grep -q '\"key-offset\": %llu'", path,
              (unsigned long long)e.slots[7].key_offset) == 0);
    /* ... and qemu-io reads what we wrote, with the second password. */
    CHECK(run("qemu-io --object secret,id=s0,data=second --image-opts -c 'read -P 0x3c 8192 4096' "
              "driver=qcow2,file.filename='%s',encrypt.key-secret=s0 >/dev/null",
              path) == 0);

    /* Without the key: the header is still described; data I/O is refused. */
    img = open_pw(path, NULL, 0, QCOW2_OPEN_WITHOUT_KEY | QCOW2_OPEN_RDONLY, &rc);
    MUST(rc);
    struct qcow2_crypt_info e2;
    MUST(qcow2_encryption_info(img, &e2));
    CHECK(strcmp(e2.uuid, e.uuid) == 0 && e2.slots[1].active);
    EXPECT_ERR(qcow2_read(img, 0, data, 512), QCOW2_ERR_BAD_KEY);
    MUST(qcow2_close(img));

    /* Legacy AES and plain images. */
    char *aes = path_in(dir, "aes.qcow2");
    MUST(qcow2_create_options_init(&c));
    c.encrypt_format = QCOW2_ENCRYPT_AES;
    c.password = PW;
    c.password_len = sizeof PW;
    MUST(qcow2_create(aes, MIB, &c));
    img = open_pw(aes, PW, sizeof PW, QCOW2_OPEN_RDONLY, &rc);
    MUST(rc);
    MUST(qcow2_encryption_info(img, &e));
    CHECK(e.crypt_method == QCOW2_CRYPT_AES && e.cipher_alg == NULL && e.slots[0].active == false);
    MUST(qcow2_close(img));
    char *plain = path_in(dir, "plain.qcow2");
    MUST(qcow2_create(plain, MIB, NULL));
    MUST(qcow2_open(plain, QCOW2_OPEN_RDONLY, &img));
    memset(&e, 0x55, sizeof e);
    MUST(qcow2_encryption_info(img, &e));
    CHECK(e.crypt_method == QCOW2_CRYPT_NONE && e.hash_alg == NULL && e.uuid[0] == 0);
    NULL_ARG(qcow2_encryption_info(img, NULL), "qcow2_encryption_info", "out");
    NULL_ARG(qcow2_encryption_info(NULL, &e), "qcow2_encryption_info", "img");
    MUST(qcow2_close(img));

    /* Bad encryption options. */
    MUST(qcow2_create_options_init(&c));
    c.encrypt_format = QCOW2_ENCRYPT_LUKS;
    EXPECT_ERR(qcow2_create(path, MIB, &c), QCOW2_ERR_INVALID_ARGUMENT); /* no password */
    c.password = PW;
    c.password_len = sizeof PW;
    c.encrypt_cipher_alg = "des";
    EXPECT_ERR(qcow2_create(path, MIB, &c), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(last_message(), "des") != NULL);
    c.encrypt_cipher_alg = NULL;
    c.encrypt_hash_alg = "md5";
    EXPECT_ERR(qcow2_create(path, MIB, &c), QCOW2_ERR_INVALID_ARGUMENT);
    c.encrypt_hash_alg = NULL;
    c.encrypt_format = 9;
    EXPECT_ERR(qcow2_create(path, MIB, &c), QCOW2_ERR_INVALID_ARGUMENT);
    free(path);
    free(aes);
    free(plain);
}

static void test_probe_and_backing(const char *dir) {
    char *q = path_in(dir, "probe.qcow2");
    char *r = path_in(dir, "probe.raw");
    char *fifo = path_in(dir, "fifo");
    char *missing = path_in(dir, "missing.qcow2");
    MUST(qcow2_create(q, MIB, NULL));
    FILE *f = fopen(r, "wb");
    CHECK(f != NULL && fputs("not an image", f) >= 0 && fclose(f) == 0);
    CHECK(mkfifo(fifo, 0600) == 0);
    qcow2_format fmt = 77;
    MUST(qcow2_probe_format(q, &fmt));
    CHECK(fmt == QCOW2_FORMAT_QCOW2);
    MUST(qcow2_probe_format(r, &fmt));
    CHECK(fmt == QCOW2_FORMAT_RAW);
    fmt = 77;
    EXPECT_ERR(qcow2_probe_format(missing, &fmt), QCOW2_ERR_IO);
    CHECK(qcow2_last_errno() == ENOENT && fmt == 77);
    EXPECT_ERR(qcow2_probe_format(fifo, &fmt), QCOW2_ERR_INVALID_ARGUMENT);
    CHECK(strstr(last_message(), "FIFO") != NULL && fmt == 77);
    NULL_ARG(qcow2_probe_format(NULL, &fmt), "qcow2_probe_format", "path");
    NULL_ARG(qcow2_probe_format(q, NULL), "qcow2_probe_format", "out");

    /* An overlay whose backing file does not exist yet (qemu-img create -u). */
    char *overlay = path_in(dir, "overlay.qcow2");
    struct qcow2_create_options c;
    MUST(qcow2_create_options_init(&c));
    CHECK(c.no_backing_open == false);
    c.backing_file = "later.qcow2";
    c.backing_format = "qcow2";
    EXPECT_ERR(qcow2_create(overlay, MIB, &c), QCOW2_ERR_IO);
    CHECK(qcow2_last_errno() == ENOENT);
    c.no_backing_open = true;
    MUST(qcow2_create(overlay, MIB, &c));
    qcow2_image *img = NULL;
    EXPECT_ERR(qcow2_open(overlay, QCOW2_OPEN_RDONLY, &img), QCOW2_ERR_IO);
    MUST(qcow2_open(overlay, QCOW2_OPEN_RDONLY | QCOW2_OPEN_NO_BACKING, &img));
    char name[64];
    size_t len = 0;
    MUST(qcow2_backing_file(img, name, sizeof name, &len));
    CHECK(strcmp(name, "later.qcow2") == 0 && len == 11);
    MUST(qcow2_close(img));
    /* Once the backing file exists, the chain opens. */
    char *later = path_in(dir, "later.qcow2");
    MUST(qcow2_create(later, MIB, NULL));
    MUST(qcow2_open(overlay, QCOW2_OPEN_RDONLY, &img));
    MUST(qcow2_close(img));
    CHECK(run("qemu-img check -q '%s'", overlay) == 0);
    free(q);
    free(r);
    free(fifo);
    free(missing);
    free(overlay);
    free(later);
}

/* Creation options, each checked by qemu-img info; an overlay on an encrypted backing file. */
static void test_create_options(const char *dir) {
    char *path = path_in(dir, "opts-all.qcow2");
    struct qcow2_create_options c;
    MUST(qcow2_create_options_init(&c));
    c.cluster_size = 4096;
    c.refcount_bits = 64;
    c.lazy_refcounts = true;
    c.preallocation = QCOW2_PREALLOC_METADATA;
    c.compression_type = QCOW2_COMPRESSION_ZSTD;
    MUST(qcow2_create(path, 3 * MIB + 512, &c));
    qcow2_image *img = NULL;
    MUST(qcow2_open(path, QCOW2_OPEN_RDONLY, &img));
    struct qcow2_image_info i;
    MUST(qcow2_info(img, &i));
    CHECK(i.cluster_size == 4096 && i.refcount_bits == 64 && i.lazy_refcounts);
    CHECK(i.compression_type == QCOW2_COMPRESSION_ZSTD && i.compat == QCOW2_COMPAT_V3);
    CHECK(i.virtual_size == 3 * MIB + 512);
    struct qcow2_map_entry m[4];
    size_t n = 0;
    MUST(qcow2_map(img, 0, MIB, m, 4, &n));
    CHECK(n >= 1 && m[0].has_offset && m[0].zero); /* preallocated metadata: zero clusters */
    MUST(qcow2_close(img));
    const char *want[] = {"\"cluster-size\": 4096", "\"refcount-bits\": 64",
                          "\"lazy-refcounts\": true", "\"compression-type\": \"zstd\""};
    for (size_t k = 0; k < sizeof want / sizeof *want; k++)
        CHECK(run("qemu-img info --output=json '%s' | grep -q '%s'", path, want[k]) == 0);
    CHECK(run("qemu-img check -q '%s'", path) == 0);

    MUST(qcow2_create_options_init(&c));
    c.compat = QCOW2_COMPAT_V2;
    MUST(qcow2_create(path, MIB, &c));
    CHECK(run("qemu-img info --output=json '%s' | grep -q '\"compat\": \"0.10\"'", path) == 0);

    /* An overlay on a LUKS backing file: creating it opens the backing file for its size only,
     * which needs no password (as `qemu-img create -b` does without one); reading through the
     * chain needs the backing password. */
    char *base = path_in(dir, "enc-base.qcow2");
    char *top = path_in(dir, "enc-top.qcow2");
    MUST(qcow2_create_options_init(&c));
    c.encrypt_format = QCOW2_ENCRYPT_LUKS;
    c.password = (const uint8_t *)"basepw";
    c.password_len = 6;
    c.encrypt_iter_time_ms = 10;
    MUST(qcow2_create(base, MIB, &c));
    qcow2_error rc;
    img = open_pw(base, "basepw", 6, 0, &rc);
    MUST(rc);
    uint8_t b[512];
    memset(b, 0xab, sizeof b);
    MUST(qcow2_write(img, 0, b, sizeof b));
    MUST(qcow2_close(img));
    MUST(qcow2_create_options_init(&c));
    c.backing_file = "enc-base.qcow2";
    c.backing_format = "qcow2";
    MUST(qcow2_create(top, 0, &c)); /* size 0: the backing file's, read without its key */
    CHECK(run("qemu-img info --output=json '%s' | grep -q '\"virtual-size\": 1048576'", top) == 0);
    c.backing_password = (const uint8_t *)"basepw";
    c.backing_password_len = 6;
    MUST(qcow2_create(top, 0, &c)); /* and with it */
    struct qcow2_open_options o;
    MUST(qcow2_open_options_init(&o));
    o.flags = QCOW2_OPEN_RDONLY;
    img = NULL;
    rc = qcow2_open_ex(top, &o, &img);
    if (rc == QCOW2_OK) {
        /* The chain may open; reading the backing data without its key must fail. */
        EXPECT_ERR(qcow2_read(img, 0, b, sizeof b), QCOW2_ERR_BAD_KEY);
        MUST(qcow2_close(img));
    } else {
        EXPECT_ERR(rc, QCOW2_ERR_BAD_KEY);
    }
    o.backing_password = (const uint8_t *)"basepw";
    o.backing_password_len = 6;
    MUST(qcow2_open_ex(top, &o, &img));
    uint64_t size = 0;
    MUST(qcow2_virtual_size(img, &size));
    CHECK(size == MIB);
    memset(b, 0, sizeof b);
    MUST(qcow2_read(img, 0, b, sizeof b));
    CHECK(b[0] == 0xab && b[511] == 0xab);
    MUST(qcow2_close(img));
    free(path);
    free(base);
    free(top);
}

/* Every pointer parameter of every function, given NULL. */
static void test_null_arguments(const char *dir) {
    char *path = path_in(dir, "null.qcow2");
    MUST(qcow2_create(path, MIB, NULL));
    qcow2_image *img = NULL;
    MUST(qcow2_open(path, 0, &img));
    uint8_t buf[512] = {0};
    uint64_t u64 = 5;
    size_t sz = 5;
    char s[64];
    struct qcow2_iovec v = {buf, sizeof buf};
    struct qcow2_image_info info;
    struct qcow2_map_entry map[2];
    struct qcow2_check_report report;
    struct qcow2_snapshot_info snap;

    NULL_ARG(qcow2_create_options_init(NULL), "qcow2_create_options_init", "out");
    NULL_ARG(qcow2_open_options_init(NULL), "qcow2_open_options_init", "out");
    NULL_ARG(qcow2_snapshot_options_init(NULL), "qcow2_snapshot_options_init", "out");
    NULL_ARG(qcow2_create(NULL, MIB, NULL), "qcow2_create", "path");
    NULL_ARG(qcow2_open(NULL, 0, &img), "qcow2_open", "path");
    NULL_ARG(qcow2_open(path, QCOW2_OPEN_RDONLY, NULL), "qcow2_open", "out");
    NULL_ARG(qcow2_open_ex(NULL, NULL, &img), "qcow2_open_ex", "path");
    NULL_ARG(qcow2_open_ex(path, NULL, NULL), "qcow2_open_ex", "out");
    NULL_ARG(qcow2_read(NULL, 0, buf, 1), "qcow2_read", "img");
    NULL_ARG(qcow2_read(img, 0, NULL, 1), "qcow2_read", "buf");
    NULL_ARG(qcow2_write(NULL, 0, buf, 1), "qcow2_write", "img");
    NULL_ARG(qcow2_write(img, 0, NULL, 1), "qcow2_write", "buf");
    NULL_ARG(qcow2_readv(NULL, 0, &v, 1), "qcow2_readv", "img");
    NULL_ARG(qcow2_writev(NULL, 0, &v, 1), "qcow2_writev", "img");
    NULL_ARG(qcow2_write_zeroes(NULL, 0, 1), "qcow2_write_zeroes", "img");
    NULL_ARG(qcow2_discard(NULL, 0, 1), "qcow2_discard", "img");
    NULL_ARG(qcow2_write_compressed(NULL, 0, buf, 1), "qcow2_write_compressed", "img");
    NULL_ARG(qcow2_write_compressed(img, 0, NULL, 1), "qcow2_write_compressed", "buf");
    NULL_ARG(qcow2_flush(NULL), "qcow2_flush", "img");
    NULL_ARG(qcow2_resize(NULL, MIB), "qcow2_resize", "img");
    NULL_ARG(qcow2_virtual_size(NULL, &u64), "qcow2_virtual_size", "img");
    NULL_ARG(qcow2_virtual_size(img, NULL), "qcow2_virtual_size", "out");
    NULL_ARG(qcow2_sync_count(NULL, &u64), "qcow2_sync_count", "img");
    NULL_ARG(qcow2_sync_count(img, NULL), "qcow2_sync_count", "out");
    NULL_ARG(qcow2_luks_add_key(NULL, buf, 1, -1, 0, false, NULL), "qcow2_luks_add_key", "img");
    NULL_ARG(qcow2_luks_remove_key(NULL, 0, NULL, 0, false, NULL), "qcow2_luks_remove_key", "img");
    NULL_ARG(qcow2_info(NULL, &info), "qcow2_info", "img");
    NULL_ARG(qcow2_info(img, NULL), "qcow2_info", "out");
    NULL_ARG(qcow2_filename(NULL, s, sizeof s, &sz), "qcow2_filename", "img");
    NULL_ARG(qcow2_filename(img, NULL, 10, &sz), "qcow2_filename", "buf");
    NULL_ARG(qcow2_filename(img, s, sizeof s, NULL), "qcow2_filename", "out_len");
    NULL_ARG(qcow2_backing_file(NULL, s, sizeof s, &sz), "qcow2_backing_file", "img");
    NULL_ARG(qcow2_backing_format(img, s, sizeof s, NULL), "qcow2_backing_format", "out_len");
    NULL_ARG(qcow2_full_backing_filename(img, NULL, 3, &sz), "qcow2_full_backing_filename", "buf");
    NULL_ARG(qcow2_damage(NULL, s, sizeof s, &sz), "qcow2_damage", "img");
    NULL_ARG(qcow2_damage(img, s, sizeof s, NULL), "qcow2_damage", "out_len");
    NULL_ARG(qcow2_map(NULL, 0, 512, map, 2, &sz), "qcow2_map", "img");
    NULL_ARG(qcow2_map(img, 0, 512, NULL, 2, &sz), "qcow2_map", "entries");
    NULL_ARG(qcow2_map(img, 0, 512, map, 2, NULL), "qcow2_map", "out_count");
    NULL_ARG(qcow2_check(NULL, QCOW2_REPAIR_NONE, &report), "qcow2_check", "img");
    NULL_ARG(qcow2_check(img, QCOW2_REPAIR_NONE, NULL), "qcow2_check", "out");
    NULL_ARG(qcow2_snapshot_count(NULL, &sz), "qcow2_snapshot_count", "img");
    NULL_ARG(qcow2_snapshot_count(img, NULL), "qcow2_snapshot_count", "out_count");
    NULL_ARG(qcow2_snapshot_get(NULL, 0, NULL, 0, NULL, 0, &snap), "qcow2_snapshot_get", "img");
    NULL_ARG(qcow2_snapshot_get(img, 0, NULL, 0, NULL, 0, NULL), "qcow2_snapshot_get", "out");
    NULL_ARG(qcow2_snapshot_view(NULL, NULL, 0, NULL, 0, &snap), "qcow2_snapshot_view", "img");
    NULL_ARG(qcow2_snapshot_create(NULL, "a", NULL, NULL, 0, NULL), "qcow2_snapshot_create", "img");
    NULL_ARG(qcow2_snapshot_create(img, NULL, NULL, NULL, 0, NULL), "qcow2_snapshot_create",
             "name");
    NULL_ARG(qcow2_snapshot_apply(NULL, "1"), "qcow2_snapshot_apply", "img");
    NULL_ARG(qcow2_snapshot_apply(img, NULL), "qcow2_snapshot_apply", "id_or_name");
    NULL_ARG(qcow2_snapshot_delete(NULL, "1"), "qcow2_snapshot_delete", "img");
    NULL_ARG(qcow2_snapshot_delete(img, NULL), "qcow2_snapshot_delete", "id_or_name");
    NULL_ARG(qcow2_encryption_info(NULL, NULL), "qcow2_encryption_info", "img");
    NULL_ARG(qcow2_probe_format(NULL, NULL), "qcow2_probe_format", "path");
    /* Outputs were left alone. */
    CHECK(u64 == 5 && sz == 5);
    /* Functions without an error code accept anything. */
    CHECK(qcow2_close(NULL) == QCOW2_OK);
    CHECK(qcow2_last_error_message(NULL, 0) == 0);
    CHECK(strcmp(qcow2_strerror(-1), "unknown error") == 0);
    CHECK(strcmp(qcow2_strerror(9999), "unknown error") == 0);
    for (int code = QCOW2_OK; code <= QCOW2_ERR_NOT_FOUND; code++)
        CHECK(strcmp(qcow2_strerror(code), "unknown error") != 0);
    MUST(qcow2_close(img));
    free(path);
}

/* Options with values out of range: refused, naming the field, nothing opened or created. */
static void test_bad_options(const char *dir) {
    char *path = path_in(dir, "opts.qcow2");
    char *never = path_in(dir, "never.qcow2");
    MUST(qcow2_create(path, MIB, NULL));
    struct qcow2_create_options c;
#define BAD_CREATE(assign, field)                                             \
    do {                                                                      \
        MUST(qcow2_create_options_init(&c));                                  \
        assign;                                                               \
        EXPECT_ERR(qcow2_create(never, MIB, &c), QCOW2_ERR_INVALID_ARGUMENT); \
        CHECK(strstr(last_message(), field) != NULL);                         \
        CHECK(strstr(last_message(), never) != NULL);                         \
    } while (0)
    BAD_CREATE(c.cluster_size = 1000, "luster");
    BAD_CREATE(c.cluster_size = 4 * MIB, "luster");
    BAD_CREATE(c.refcount_bits = 3, "efcount");
    BAD_CREATE(c.compat = 7, "compat");
    BAD_CREATE(c.preallocation = 9, "preallocation");
    BAD_CREATE(c.compression_type = 9, "compression");
    BAD_CREATE((c.compat = QCOW2_COMPAT_V2, c.lazy_refcounts = true), "azy");
    BAD_CREATE(c.backing_format = "raw", "acking file"); /* a format without a file */
    BAD_CREATE((c.password = NULL, c.password_len = 4, c.encrypt_format = QCOW2_ENCRYPT_LUKS),
               "password");
#undef BAD_CREATE

    struct qcow2_open_options o;
    qcow2_image *img = (qcow2_image *)&o; /* must stay untouched */
    qcow2_image *const sentinel = img;
#define BAD_OPEN(assign, field)                                                \
    do {                                                                       \
        MUST(qcow2_open_options_init(&o));                                     \
        assign;                                                                \
        EXPECT_ERR(qcow2_open_ex(path, &o, &img), QCOW2_ERR_INVALID_ARGUMENT); \
        CHECK(strstr(last_message(), field) != NULL);                          \
        CHECK(img == sentinel);                                                \
    } while (0)
    BAD_OPEN(o.flags = 1u << 30, "flags");
    BAD_OPEN(o.cache_mode = 42, "cache");
    BAD_OPEN(o.backing_policy = 42, "backing");
    BAD_OPEN(o.flags = QCOW2_OPEN_FORCE_SHARE, "");
    BAD_OPEN(o.flags = QCOW2_OPEN_DAMAGED, "");
    BAD_OPEN((o.flags = QCOW2_OPEN_LAZY_REFCOUNTS | QCOW2_OPEN_NO_LAZY_REFCOUNTS), "LAZY_REFCOUNTS");
    BAD_OPEN(o.snapshot = "1", ""); /* a snapshot needs read-only */
    BAD_OPEN((o.backing_policy = QCOW2_BACKING_ALLOW, o.backing_allow = NULL,
              o.backing_allow_len = 2),
             "backing_allow");
    BAD_OPEN((o.password = NULL, o.password_len = 1), "password");
#undef BAD_OPEN

    /* Cache modes and cache sizes that are valid work. */
    for (qcow2_cache_mode m = QCOW2_CACHE_WRITEBACK; m <= QCOW2_CACHE_UNSAFE; m++) {
        MUST(qcow2_open_options_init(&o));
        o.cache_mode = m;
        o.l2_cache_size = 65536;
        o.refcount_cache_size = 65536;
        img = NULL;
        qcow2_error rc = qcow2_open_ex(path, &o, &img);
        /* O_DIRECT may be refused by the file system of the scratch directory (tmpfs). */
        if (rc != QCOW2_OK && (m == QCOW2_CACHE_NONE || m == QCOW2_CACHE_DIRECTSYNC)) continue;
        MUST(rc);
        uint8_t b[4096];
        memset(b, (int)m, sizeof b);
        MUST(qcow2_write(img, 4096 * (uint64_t)m, b, sizeof b));
        MUST(qcow2_flush(img));
        MUST(qcow2_close(img));
    }
    CHECK(run("qemu-img check -q '%s'", path) == 0);

    /* Force-share: a read-only open beside a writer. */
    qcow2_image *writer = NULL, *reader = NULL;
    MUST(qcow2_open(path, 0, &writer));
    EXPECT_ERR(qcow2_open(path, QCOW2_OPEN_RDONLY, &reader), QCOW2_ERR_LOCKED);
    MUST(qcow2_open(path, QCOW2_OPEN_RDONLY | QCOW2_OPEN_FORCE_SHARE, &reader));
    MUST(qcow2_close(reader));
    MUST(qcow2_close(writer));
    free(path);
    free(never);
}

static void write_bytes(const char *path, long at, const void *data, size_t len) {
    FILE *f = fopen(path, "r+b");
    CHECK(f != NULL);
    if (!f) return;
    CHECK(fseek(f, at, SEEK_SET) == 0 && fwrite(data, 1, len, f) == len);
    CHECK(fclose(f) == 0);
}

static void expect_open_fails(const char *path, qcow2_error code, const char *what) {
    qcow2_image *img = NULL;
    qcow2_error rc = qcow2_open(path, QCOW2_OPEN_RDONLY, &img);
    if (rc != code) {
        fprintf(stderr, "%s: open returned %d (%s), expected %d\n", what, (int)rc,
                qcow2_strerror((int)rc), (int)code);
        print_last_error();
        failures++;
    }
    CHECK(img == NULL);
    CHECK(strstr(last_message(), path) != NULL); /* the message names the file */
    if (img) qcow2_close(img);
}

/* Damaged files: a clear error naming the file, never a crash. */
static void test_corrupt(const char *dir) {
    char *path = path_in(dir, "bad.qcow2");
    /* Empty file, and only the magic. */
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL && fclose(f) == 0);
    expect_open_fails(path, QCOW2_ERR_CORRUPT, "empty file");
    f = fopen(path, "wb");
    CHECK(f != NULL && fwrite("QFI\xfb", 1, 4, f) == 4 && fclose(f) == 0);
    expect_open_fails(path, QCOW2_ERR_CORRUPT, "magic only");

    /* A cluster size of 2^40 (cluster_bits at byte 20). */
    MUST(qcow2_create(path, MIB, NULL));
    const uint8_t bits40[4] = {0, 0, 0, 40};
    write_bytes(path, 20, bits40, 4);
    expect_open_fails(path, QCOW2_ERR_UNSUPPORTED, "cluster_bits 40");

    /* Version 9. */
    MUST(qcow2_create(path, MIB, NULL));
    const uint8_t v9[4] = {0, 0, 0, 9};
    write_bytes(path, 4, v9, 4);
    expect_open_fails(path, QCOW2_ERR_UNSUPPORTED, "version 9");

    /* An L1 table past the end of the file (l1_table_offset at byte 40). */
    MUST(qcow2_create(path, MIB, NULL));
    const uint8_t far[8] = {0, 0, 0, 1, 0, 0, 0, 0};
    write_bytes(path, 40, far, 8);
    expect_open_fails(path, QCOW2_ERR_CORRUPT, "L1 past the end");
    /* ... which QCOW2_OPEN_DAMAGED opens for inspection, and check reports. */
    qcow2_image *img = NULL;
    MUST(qcow2_open(path, QCOW2_OPEN_RDONLY | QCOW2_OPEN_DAMAGED, &img));
    size_t dlen = 0;
    MUST(qcow2_damage(img, NULL, 0, &dlen));
    CHECK(dlen > 0);
    char *damage = xcalloc(dlen + 1);
    EXPECT_ERR(qcow2_damage(img, damage, dlen, &dlen), QCOW2_ERR_BUFFER_TOO_SMALL);
    MUST(qcow2_damage(img, damage, dlen + 1, &dlen));
    CHECK(strlen(damage) == dlen && strstr(damage, "L1") != NULL);
    free(damage);
    struct qcow2_check_report r;
    MUST(qcow2_check(img, QCOW2_REPAIR_NONE, &r));
    CHECK(r.exit_code != 0);
    EXPECT_ERR(qcow2_check(img, QCOW2_REPAIR_ALL, &r), QCOW2_ERR_READ_ONLY);
    MUST(qcow2_close(img));

    /* An L2 entry pointing far past the end: the open works, reading that cluster fails with
     * CORRUPT naming the offset; check finds it and repair cannot make it vanish silently. */
    char *l2 = path_in(dir, "badl2.qcow2");
    struct qcow2_create_options c;
    MUST(qcow2_create_options_init(&c));
    MUST(qcow2_create(l2, MIB, &c));
    MUST(qcow2_open(l2, 0, &img));
    uint8_t data[65536];
    memset(data, 1, sizeof data);
    MUST(qcow2_write(img, 0, data, sizeof data));
    MUST(qcow2_close(img));
    CHECK(run("qemu-img info --output=json '%s' >/dev/null", l2) == 0);
    /* The L1 table is at cluster 3 (header, refcount table, refcount block); its first entry
     * points to the L2 table; rewrite the L2 table's first entry (copied bit + offset 1 TiB). */
    f = fopen(l2, "rb");
    uint8_t l1e[8] = {0};
    CHECK(f != NULL && fseek(f, 3 * 65536, SEEK_SET) == 0 && fread(l1e, 1, 8, f) == 8);
    if (f) fclose(f);
    uint64_t l2_off = 0;
    for (int i = 0; i < 8; i++) l2_off = l2_off << 8 | l1e[i];
    l2_off &= 0x00fffffffffffe00ull;
    CHECK(l2_off != 0);
    const uint8_t bad_entry[8] = {0x80, 0, 0x01, 0, 0, 0, 0, 0};
    if (l2_off) write_bytes(l2, (long)l2_off, bad_entry, 8);
    MUST(qcow2_open(l2, QCOW2_OPEN_RDONLY, &img));
    char none[8] = "x";
    MUST(qcow2_damage(img, none, sizeof none, &dlen));
    CHECK(dlen == 0 && none[0] == 0); /* not opened with QCOW2_OPEN_DAMAGED: nothing */
    EXPECT_ERR(qcow2_read(img, 0, data, 512), QCOW2_ERR_CORRUPT);
    CHECK(strstr(last_message(), l2) != NULL);
    MUST(qcow2_check(img, QCOW2_REPAIR_NONE, &r));
    CHECK(r.corruptions > 0 && r.exit_code == 2);
    MUST(qcow2_close(img));
    /* qemu-img agrees: exit code 2, corruptions. */
    CHECK(run("qemu-img check -q '%s' >/dev/null 2>&1; test $? -eq 2", l2) == 0);

    /* Leaks: clear the L1 entry, so the L2 table and the data cluster are referenced by nothing.
     * check counts two leaks (exit code 3, as qemu-img's); QCOW2_REPAIR_LEAKS frees them. */
    char *leaky = path_in(dir, "leaky.qcow2");
    MUST(qcow2_create(leaky, MIB, NULL));
    MUST(qcow2_open(leaky, 0, &img));
    MUST(qcow2_write(img, 0, data, sizeof data));
    MUST(qcow2_close(img));
    const uint8_t zero_entry[8] = {0};
    write_bytes(leaky, 3 * 65536, zero_entry, 8);
    MUST(qcow2_open(leaky, 0, &img));
    memset(&r, 0xff, sizeof r);
    MUST(qcow2_check(img, QCOW2_REPAIR_NONE, &r));
    CHECK(r.leaks == 2 && r.corruptions == 0 && r.exit_code == 3 && r.leaks_fixed == 0);
    EXPECT_ERR(qcow2_check(img, 7, &r), QCOW2_ERR_INVALID_ARGUMENT);
    MUST(qcow2_check(img, QCOW2_REPAIR_LEAKS, &r));
    CHECK(r.leaks == 0 && r.leaks_fixed == 2 && r.exit_code == 0);
    MUST(qcow2_read(img, 0, data, 512));
    CHECK(data[0] == 0); /* the cluster is gone: reads as zeros */
    MUST(qcow2_close(img));
    CHECK(run("qemu-img check -q '%s'", leaky) == 0);
    free(leaky);
    free(l2);
    free(path);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    test_version();
    test_vectored(dir);
    test_encryption_info(dir);
    test_probe_and_backing(dir);
    test_create_options(dir);
    test_null_arguments(dir);
    test_bad_options(dir);
    test_corrupt(dir);
    if (failures) {
        fprintf(stderr, "test_api: %d checks failed\n", failures);
        return 1;
    }
    printf("test_api: all checks passed\n");
    return 0;
}

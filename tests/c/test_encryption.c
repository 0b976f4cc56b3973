/*
 * Encrypted images through the C API: create LUKS (default and cbc-essiv) and legacy AES images
 * with the password as pointer + length (UTF-8 bytes without a terminator; a prefix is wrong),
 * write and read them, reopen, wrong and missing passwords (QCOW2_ERR_BAD_KEY), inspection
 * without a key, bad cipher names; then qemu-io reads what we wrote with the same secret.
 *
 * Usage: test_encryption DIR   (DIR: an empty scratch directory)
 */
#define _POSIX_C_SOURCE 200809L

#include "qcow2rs.h"
#include "check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* "p\u00e4ssword" in UTF-8 (9 bytes), as bytes + length (no terminator): what QEMU can share. */
static const uint8_t PASSWORD[] = {'p', 0xc3, 0xa4, 's', 's', 'w', 'o', 'r', 'd'};

static void one(const char *dir, const char *name, qcow2_encrypt_format fmt, const char *mode,
                const char *ivgen) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.qcow2", dir, name);
    struct qcow2_create_options c;
    MUST(qcow2_create_options_init(&c));
    c.encrypt_format = fmt;
    c.password = PASSWORD;
    c.password_len = sizeof PASSWORD;
    c.encrypt_cipher_mode = mode;
    c.encrypt_ivgen_alg = ivgen;
    c.encrypt_iter_time_ms = 10;
    MUST(qcow2_create(path, 4 << 20, &c));

    qcow2_error rc;
    qcow2_image *img = open_pw(path, PASSWORD, sizeof PASSWORD, 0, &rc);
    MUST(rc);
    struct qcow2_image_info info;
    MUST(qcow2_info(img, &info));
    CHECK(info.crypt_method == (fmt == QCOW2_ENCRYPT_LUKS ? QCOW2_CRYPT_LUKS : QCOW2_CRYPT_AES));
    static uint8_t buf[200000], back[200000];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)(i * 7 + 3);
    MUST(qcow2_write(img, 1000, buf, sizeof buf)); /* unaligned: read-modify-write of sectors */
    MUST(qcow2_flush(img));
    MUST(qcow2_close(img));

    img = open_pw(path, PASSWORD, sizeof PASSWORD, QCOW2_OPEN_RDONLY, &rc);
    MUST(rc);
    MUST(qcow2_read(img, 1000, back, sizeof back));
    CHECK(memcmp(buf, back, sizeof buf) == 0);
    MUST(qcow2_close(img));

    if (fmt == QCOW2_ENCRYPT_LUKS) {
        /* Key slots: add a second password, open with it, erase the first; the last one stays. */
        static const uint8_t SECOND[] = "second password";
        img = open_pw(path, PASSWORD, sizeof PASSWORD, 0, &rc);
        MUST(rc);
        int32_t slot = -7;
        MUST(qcow2_luks_add_key(img, SECOND, sizeof SECOND - 1, -1, 10, false, &slot));
        CHECK(slot == 1);
        EXPECT_ERR(qcow2_luks_add_key(img, SECOND, sizeof SECOND - 1, 1, 10, false, NULL),
                   QCOW2_ERR_INVALID_ARGUMENT); /* active: needs force */
        EXPECT_ERR(qcow2_luks_add_key(img, NULL, 0, -1, 10, false, NULL),
                   QCOW2_ERR_INVALID_ARGUMENT);
        uint32_t count = 99;
        MUST(qcow2_luks_remove_key(img, -1, PASSWORD, sizeof PASSWORD, false, &count));
        CHECK(count == 1);
        EXPECT_ERR(qcow2_luks_remove_key(img, 1, NULL, 0, false, NULL), QCOW2_ERR_INVALID_ARGUMENT);
        MUST(qcow2_close(img));
        img = open_pw(path, PASSWORD, sizeof PASSWORD, QCOW2_OPEN_RDONLY, &rc);
        CHECK(img == NULL && rc == QCOW2_ERR_BAD_KEY);
        img = open_pw(path, SECOND, sizeof SECOND - 1, 0, &rc);
        MUST(rc);
        MUST(qcow2_read(img, 1000, back, sizeof back));
        CHECK(memcmp(buf, back, sizeof buf) == 0);
        /* Put the first password back (slot 0 is free again) for the checks below. */
        MUST(qcow2_luks_add_key(img, PASSWORD, sizeof PASSWORD, 0, 10, false, &slot));
        CHECK(slot == 0);
        MUST(qcow2_close(img));

        /* The length counts: a prefix of the password is a wrong password. */
        img = open_pw(path, PASSWORD, 4, QCOW2_OPEN_RDONLY, &rc);
        CHECK(img == NULL);
        CHECK(rc == QCOW2_ERR_BAD_KEY);
        char msg[1024];
        qcow2_last_error_message(msg, sizeof msg);
        CHECK(strstr(msg, "Invalid password") != NULL);
        CHECK(strstr(msg, name) != NULL);
    }
    /* No password: refused, unless opened for inspection. */
    img = open_pw(path, NULL, 0, QCOW2_OPEN_RDONLY, &rc);
    CHECK(img == NULL);
    CHECK(rc == QCOW2_ERR_BAD_KEY);
    img = open_pw(path, NULL, 0, QCOW2_OPEN_RDONLY | QCOW2_OPEN_WITHOUT_KEY, &rc);
    MUST(rc);
    MUST(qcow2_info(img, &info));
    CHECK(info.virtual_size == 4 << 20);
    EXPECT_ERR(qcow2_read(img, 0, back, 512), QCOW2_ERR_BAD_KEY);
    MUST(qcow2_close(img));

    /* qemu-io reads what we wrote (the same bytes, as base64). */
    CHECK(run("qemu-io --object secret,id=k,data=cMOkc3N3b3Jk,format=base64 --image-opts "
              "'driver=qcow2,file.filename=%s,encrypt.key-secret=k' -c 'read -P 0 0 1000' "
              "| grep -q 'read 1000/1000'",
              path) == 0);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    one(argv[1], "luks", QCOW2_ENCRYPT_LUKS, NULL, NULL);
    one(argv[1], "luks-cbc", QCOW2_ENCRYPT_LUKS, "cbc", "essiv");
    one(argv[1], "aes", QCOW2_ENCRYPT_AES, NULL, NULL);

    /* Bad options are invalid arguments, before any file is made. */
    struct qcow2_create_options c;
    MUST(qcow2_create_options_init(&c));
    char path[1024];
    snprintf(path, sizeof path, "%s/bad.qcow2", argv[1]);
    c.encrypt_format = QCOW2_ENCRYPT_LUKS;
    EXPECT_ERR(qcow2_create(path, 1 << 20, &c), QCOW2_ERR_INVALID_ARGUMENT); /* no password */
    c.password = PASSWORD;
    c.password_len = sizeof PASSWORD;
    c.encrypt_cipher_alg = "serpent-256";
    EXPECT_ERR(qcow2_create(path, 1 << 20, &c), QCOW2_ERR_INVALID_ARGUMENT);
    c.encrypt_cipher_alg = NULL;
    c.encrypt_format = 7;
    EXPECT_ERR(qcow2_create(path, 1 << 20, &c), QCOW2_ERR_INVALID_ARGUMENT);

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C encryption checks passed\n");
    return 0;
}

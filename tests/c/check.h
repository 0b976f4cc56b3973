/*
 * Shared by the C test programs: CHECK / MUST / EXPECT_ERR, the last error's details, running a
 * shell command (qemu-img), and small helpers. Include it after qcow2rs.h, in one file per program.
 */
#ifndef QCOW2RS_TEST_CHECK_H
#define QCOW2RS_TEST_CHECK_H

#include "qcow2rs.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Checks that failed; main() returns 1 when it is not 0. */
static int failures;

static inline void print_last_error(void) {
    char msg[1024];
    qcow2_last_error_message(msg, sizeof msg);
    fprintf(stderr, "    last error: code %d, errno %d, message \"%s\"\n", (int)qcow2_last_error(),
            qcow2_last_errno(), msg);
}

#define CHECK(cond)                                                                     \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);    \
            print_last_error();                                                         \
            failures++;                                                                 \
        }                                                                               \
    } while (0)

/* A call that must succeed; the test cannot go on without it. */
#define MUST(call)                                                                       \
    do {                                                                                 \
        qcow2_error rc_ = (call);                                                        \
        if (rc_ != QCOW2_OK) {                                                           \
            fprintf(stderr, "%s:%d: %s returned %d (%s)\n", __FILE__, __LINE__, #call,   \
                    (int)rc_, qcow2_strerror((int)rc_));                                 \
            print_last_error();                                                          \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

/* A call that must fail with `code`. */
#define EXPECT_ERR(call, code)                                                           \
    do {                                                                                 \
        qcow2_error rc_ = (call);                                                        \
        if (rc_ != (code)) {                                                             \
            fprintf(stderr, "%s:%d: %s returned %d (%s), expected %s\n", __FILE__,       \
                    __LINE__, #call, (int)rc_, qcow2_strerror((int)rc_), #code);         \
            print_last_error();                                                          \
            failures++;                                                                  \
        }                                                                                \
    } while (0)

/* Open `path` with `flags` and the password `pw` (`len` bytes; NULL for none); the result code in
 * `*rc`, the handle (NULL on failure) returned. */
static inline qcow2_image *open_pw(const char *path, const void *pw, size_t len, uint32_t flags,
                                   qcow2_error *rc) {
    struct qcow2_open_options o;
    MUST(qcow2_open_options_init(&o));
    o.flags = flags;
    o.password = pw;
    o.password_len = len;
    qcow2_image *img = NULL;
    *rc = qcow2_open_ex(path, &o, &img);
    return img;
}

/* The last error message of this thread, in a static buffer. */
static inline const char *last_message(void) {
    static char msg[4096];
    qcow2_last_error_message(msg, sizeof msg);
    return msg;
}

/* Run a shell command (printf-style); returns its exit code (128 + N for signal N, -1 when it
 * could not be started) and reports a non-zero one on stderr. */
static inline int run(const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    fflush(stdout);
    fflush(stderr);
    int status = system(cmd);
    if (status == -1) {
        perror("system");
        return -1;
    }
    int code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f);
    if (code != 0) fprintf(stderr, "command failed with exit code %d: %s\n", code, cmd);
    return code;
}

/* "DIR/NAME", malloc'ed. */
static inline char *path_in(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (!p) {
        perror("malloc");
        exit(1);
    }
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* `n` zeroed bytes, or exit. */
static inline void *xcalloc(size_t n) {
    void *p = calloc(1, n);
    if (!p) {
        perror("calloc");
        exit(1);
    }
    return p;
}

#endif /* QCOW2RS_TEST_CHECK_H */

/*
 * One qcow2_image shared by several threads: each writer writes its own region in unaligned chunks
 * (allocating clusters and L2 tables concurrently; every other chunk with qcow2_writev), reads
 * back, and flushes, while the others do the same; reader threads meanwhile read the whole disk
 * (with qcow2_read and qcow2_readv) and check that every byte is either still zero or already
 * what its writer writes, never anything else; then the whole disk is verified, and qemu-img
 * checks the result.
 *
 * Usage: test_threads DIR
 */
#define _POSIX_C_SOURCE 200809L

#include "qcow2rs.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THREADS 4
#define READERS 2
#define REGION (1u << 20)
#define CHUNK 4099u
#define SIZE ((uint64_t)THREADS * REGION * 2)

static qcow2_image *img;

struct job {
    int id;
    int failed;
    char msg[512];
};

static uint8_t expected_byte(uint64_t off) {
    return (uint8_t)((off * 31 + off / 4099) ^ 0x5a);
}

static void fail(struct job *job, const char *what, qcow2_error rc) {
    char last[256];
    qcow2_last_error_message(last, sizeof last);
    snprintf(job->msg, sizeof job->msg, "thread %d: %s failed with %d: %s", job->id, what,
             (int)rc, last);
    job->failed = 1;
}

static void *worker(void *arg) {
    struct job *job = arg;
    /* Regions are interleaved with gaps so that threads allocate in shared L2 tables. */
    uint64_t base = (uint64_t)job->id * 2 * REGION + 3;
    uint8_t buf[CHUNK], back[CHUNK];
    for (uint64_t pos = 0; pos < REGION; pos += CHUNK) {
        uint64_t off = base + pos;
        size_t len = (size_t)(REGION - pos < CHUNK ? REGION - pos : CHUNK);
        for (size_t i = 0; i < len; i++) buf[i] = expected_byte(off + i);
        qcow2_error rc;
        if ((pos / CHUNK) % 2) {
            /* The same bytes as three buffers: 1 byte, most of it, the last 10. */
            struct qcow2_iovec iov[3] = {
                {buf, 1}, {buf + 1, len > 11 ? len - 11 : 0}, {buf + (len > 11 ? len - 10 : 1), 0}};
            iov[2].len = len - 1 - iov[1].len;
            rc = qcow2_writev(img, off, iov, 3);
        } else {
            rc = qcow2_write(img, off, buf, len);
        }
        if (rc != QCOW2_OK) {
            fail(job, (pos / CHUNK) % 2 ? "qcow2_writev" : "qcow2_write", rc);
            return NULL;
        }
        rc = qcow2_read(img, off, back, len);
        if (rc != QCOW2_OK) {
            fail(job, "qcow2_read", rc);
            return NULL;
        }
        if (memcmp(buf, back, len) != 0) {
            snprintf(job->msg, sizeof job->msg, "thread %d: read-back mismatch at %llu", job->id,
                     (unsigned long long)off);
            job->failed = 1;
            return NULL;
        }
        if ((pos / CHUNK) % 37 == 0 && (rc = qcow2_flush(img)) != QCOW2_OK) {
            fail(job, "qcow2_flush", rc);
            return NULL;
        }
    }
    /* Errors stay per thread: provoke one here and check another thread's state is not shared. */
    if (qcow2_read(img, SIZE, buf, 1) != QCOW2_ERR_INVALID_ARGUMENT ||
        qcow2_last_error() != QCOW2_ERR_INVALID_ARGUMENT) {
        snprintf(job->msg, sizeof job->msg, "thread %d: read past the end did not fail", job->id);
        job->failed = 1;
    }
    return NULL;
}

static atomic_int writers_done;

/* Read the whole disk over and over while the writers run: each byte must be 0 (not written
 * yet) or its final value (written), since writers only ever write a byte's final value. */
static void *reader(void *arg) {
    struct job *job = arg;
    const size_t span = 65536 + 17;
    uint8_t *buf = malloc(span);
    if (!buf) {
        snprintf(job->msg, sizeof job->msg, "reader %d: out of memory", job->id);
        job->failed = 1;
        return NULL;
    }
    int rounds = 0;
    while (!atomic_load(&writers_done) || rounds < 1) {
        for (uint64_t off = (uint64_t)job->id * 4093; off + span <= SIZE; off += span) {
            qcow2_error rc;
            if ((off / span) % 2) {
                struct qcow2_iovec iov[2] = {{buf, 100}, {buf + 100, span - 100}};
                rc = qcow2_readv(img, off, iov, 2);
            } else {
                rc = qcow2_read(img, off, buf, span);
            }
            if (rc != QCOW2_OK) {
                fail(job, "reader: qcow2_read(v)", rc);
                free(buf);
                return NULL;
            }
            for (size_t i = 0; i < span; i++) {
                uint64_t o = off + i;
                uint64_t rel = o % (2 * REGION);
                uint8_t final = (rel >= 3 && rel < REGION + 3) ? expected_byte(o) : 0;
                if (buf[i] != 0 && buf[i] != final) {
                    snprintf(job->msg, sizeof job->msg,
                             "reader %d: byte at %llu is %u, neither 0 nor %u", job->id,
                             (unsigned long long)o, buf[i], final);
                    job->failed = 1;
                    free(buf);
                    return NULL;
                }
            }
        }
        rounds++;
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/threads.qcow2", argv[1]);
    qcow2_create_options opts;
    qcow2_create_options_init(&opts);
    opts.cluster_size = 16384; /* small clusters: more allocations, several L2 tables */
    if (qcow2_create(path, SIZE, &opts) != QCOW2_OK || qcow2_open(path, 0, &img) != QCOW2_OK) {
        char msg[512];
        qcow2_last_error_message(msg, sizeof msg);
        fprintf(stderr, "setup failed: %s\n", msg);
        return 1;
    }

    pthread_t threads[THREADS];
    struct job jobs[THREADS];
    for (int i = 0; i < THREADS; i++) {
        jobs[i] = (struct job){.id = i};
        if (pthread_create(&threads[i], NULL, worker, &jobs[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    pthread_t readers[READERS];
    struct job reader_jobs[READERS];
    for (int i = 0; i < READERS; i++) {
        reader_jobs[i] = (struct job){.id = i};
        if (pthread_create(&readers[i], NULL, reader, &reader_jobs[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    int failed = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        if (jobs[i].failed) {
            fprintf(stderr, "%s\n", jobs[i].msg);
            failed = 1;
        }
    }
    atomic_store(&writers_done, 1);
    for (int i = 0; i < READERS; i++) {
        pthread_join(readers[i], NULL);
        if (reader_jobs[i].failed) {
            fprintf(stderr, "%s\n", reader_jobs[i].msg);
            failed = 1;
        }
    }
    /* The main thread made no failing call: its last error is untouched by the workers. */
    if (qcow2_last_error() != QCOW2_OK) {
        fprintf(stderr, "main thread sees a last error it did not cause\n");
        failed = 1;
    }

    /* Verify everything, including the gaps (zeros). */
    uint8_t *all = malloc(SIZE);
    if (!all || qcow2_read(img, 0, all, SIZE) != QCOW2_OK) {
        fprintf(stderr, "final read failed\n");
        return 1;
    }
    for (uint64_t off = 0; off < SIZE; off++) {
        uint64_t rel = off % (2 * REGION);
        uint8_t want = (rel >= 3 && rel < REGION + 3) ? expected_byte(off) : 0;
        if (all[off] != want) {
            fprintf(stderr, "mismatch at %llu: got %u, want %u\n", (unsigned long long)off,
                    all[off], want);
            failed = 1;
            break;
        }
    }
    free(all);
    if (qcow2_close(img) != QCOW2_OK) {
        fprintf(stderr, "close failed\n");
        return 1;
    }

    char cmd[8192];
    snprintf(cmd, sizeof cmd, "qemu-img check -q '%s'", path);
    fflush(stdout);
    if (system(cmd) != 0) {
        fprintf(stderr, "qemu-img check failed\n");
        failed = 1;
    }
    if (!failed) printf("%d writers, %d readers: all checks passed\n", THREADS, READERS);
    return failed;
}

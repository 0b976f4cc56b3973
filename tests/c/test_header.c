/*
 * The header is self-contained, idempotent (included twice), and valid C11 and C++17. Compiled
 * with -fsyntax-only as C and as C++ by tests/tests/c_api.rs.
 */
#include "qcow2rs.h"
#include "qcow2rs.h"

#ifdef __cplusplus
static_assert(sizeof(qcow2_error) == sizeof(int), "qcow2_error is an int-sized enum");
#else
_Static_assert(sizeof(qcow2_error) == sizeof(int), "qcow2_error is an int-sized enum");
#endif

/* Every public name is usable; the function pointer types match the declarations. */
qcow2_error (*const open_fn)(const char *, uint32_t, qcow2_image **) = qcow2_open;
qcow2_error (*const read_fn)(const qcow2_image *, uint64_t, uint8_t *, size_t) = qcow2_read;
qcow2_error (*const write_fn)(qcow2_image *, uint64_t, const uint8_t *, size_t) = qcow2_write;
size_t (*const message_fn)(char *, size_t) = qcow2_last_error_message;
qcow2_error (*const snapshot_get_fn)(const qcow2_image *, size_t, char *, size_t, char *, size_t,
                                     qcow2_snapshot_info *) = qcow2_snapshot_get;
qcow2_error (*const snapshot_create_fn)(qcow2_image *, const char *,
                                        const qcow2_snapshot_options *, char *, size_t,
                                        qcow2_snapshot_info *) = qcow2_snapshot_create;
qcow2_error (*const snapshot_apply_fn)(qcow2_image *, const char *) = qcow2_snapshot_apply;
qcow2_error (*const readv_fn)(const qcow2_image *, uint64_t, const qcow2_iovec *, size_t) =
    qcow2_readv;
qcow2_error (*const writev_fn)(qcow2_image *, uint64_t, const qcow2_iovec *, size_t) = qcow2_writev;
qcow2_error (*const encryption_info_fn)(const qcow2_image *, qcow2_crypt_info *) =
    qcow2_encryption_info;
qcow2_error (*const probe_fn)(const char *, qcow2_format *) = qcow2_probe_format;
uint32_t (*const version_number_fn)(void) = qcow2_version_number;

/* The version macros are usable in #if and as a string. */
#if QCOW2RS_VERSION_NUMBER != ((QCOW2RS_VERSION_MAJOR << 16) | (QCOW2RS_VERSION_MINOR << 8) | \
                               QCOW2RS_VERSION_PATCH)
#error "QCOW2RS_VERSION_NUMBER does not match MAJOR.MINOR.PATCH"
#endif
static const char version[] = QCOW2RS_VERSION;

int header_uses(void);
int header_uses(void) {
    qcow2_create_options c;
    qcow2_open_options o;
    qcow2_image_info i;
    qcow2_map_entry m;
    qcow2_check_report r;
    qcow2_snapshot_info si;
    qcow2_snapshot_options so;
    char id[QCOW2_SNAPSHOT_ID_SIZE];
    qcow2_iovec v;
    qcow2_crypt_info e;
    qcow2_luks_slot ls;
    (void)v;
    (void)e;
    (void)ls;
    (void)si;
    (void)so;
    (void)id;
    (void)c;
    (void)o;
    (void)i;
    (void)m;
    (void)r;
    return QCOW2_OK + QCOW2_ERR_BUFFER_TOO_SMALL + QCOW2_OPEN_RDONLY + QCOW2_CACHE_UNSAFE +
           QCOW2_COMPAT_V2 + QCOW2_REPAIR_ALL + QCOW2_CRYPT_LUKS + QCOW2_ERR_NOT_FOUND +
           QCOW2_FORMAT_RAW + QCOW2_LUKS_SLOTS + QCOW2_UUID_SIZE + (int)sizeof version;
}

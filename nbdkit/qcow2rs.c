/*
 * nbdkit-qcow2rs-plugin: serve a qcow2 image (encrypted or not) over NBD with libqcow2rs.
 *
 *   nbdkit -U SOCKET ./nbdkit-qcow2rs-plugin.so file=disk.qcow2 [password-file=PATH]
 *          [readonly=true] [force-share=true] [cache=writeback] [backing=true]
 *
 * One image handle is opened when the server is ready (before it forks into the background, so
 * a bad image or a wrong password stops the server with a message) and shared by every
 * connection and request: libqcow2rs handles may be used from many threads at once, so the
 * thread model is PARALLEL. Because all connections share that handle and qcow2_flush() covers
 * every write that completed before it, a flush on one connection covers writes on all of them:
 * multi-conn is safe. FUA is emulated with a flush (native in the write-through cache modes).
 * Block status (extents) comes from qcow2_map(). Zeroing uses qcow2_write_zeroes(), which makes
 * zero clusters in v3 images: fast zero is offered there and refused for v2 images, where
 * zeroing may mean writing zeros.
 *
 * The password is read from a file (password-file=PATH: the file's bytes as they are, as QEMU's
 * `--object secret,file=PATH` reads them) or given with password=... (nbdkit's syntax: "-" asks
 * on the terminal, "+FILE" reads a file, "-FD" a file descriptor). The plugin wipes its copy as
 * soon as the image is open; libqcow2rs keeps only the derived key.
 *
 * Built against the installed library with pkg-config (see Makefile and README.md here).
 */

#define _DEFAULT_SOURCE /* explicit_bzero */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nbdkit-plugin.h>

#include "qcow2rs.h"

/* Configuration (set in config, read-only afterwards). */
static char *filename;     /* absolute path (nbdkit_realpath) */
static uint8_t *password;  /* NULL when none; wiped and freed once the image is open */
static size_t password_len;
static bool readonly;
static bool force_share;
static bool no_backing;
static qcow2_cache_mode cache_mode = QCOW2_CACHE_WRITEBACK;

/* The image, shared by all connections; opened in get_ready, closed in cleanup. */
static qcow2_image *image;
static bool is_v3;

static void
wipe_password (void)
{
  if (password) {
    explicit_bzero (password, password_len);
    free (password);
    password = NULL;
    password_len = 0;
  }
}

/* Report the calling thread's last libqcow2rs error through nbdkit and set errno for the NBD reply. */
static int
fail (const char *what, qcow2_error code)
{
  char msg[1024];
  int err = qcow2_last_errno ();

  qcow2_last_error_message (msg, sizeof msg);
  nbdkit_error ("qcow2rs: %s: %s", what, msg);
  switch (code) {
  case QCOW2_ERR_READ_ONLY:        err = EROFS; break;
  case QCOW2_ERR_NO_SPACE:         err = ENOSPC; break;
  case QCOW2_ERR_INVALID_ARGUMENT: err = EINVAL; break;
  case QCOW2_ERR_UNSUPPORTED:      err = ENOTSUP; break;
  case QCOW2_ERR_IO:               if (err == 0) err = EIO; break;
  default:                         err = EIO; break;
  }
  errno = err;
  return -1;
}

static int
read_password_file (const char *path)
{
  struct stat st;
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    nbdkit_error ("password-file: cannot open %s: %m", path);
    return -1;
  }
  if (fstat (fd, &st) < 0 || !S_ISREG (st.st_mode) || st.st_size > 65536) {
    nbdkit_error ("password-file: %s is not a regular file of at most 64 KiB", path);
    close (fd);
    return -1;
  }
  wipe_password ();
  password = malloc (st.st_size > 0 ? (size_t) st.st_size : 1);
  if (!password) {
    nbdkit_error ("malloc: %m");
    close (fd);
    return -1;
  }
  while (password_len < (size_t) st.st_size) {
    ssize_t n = read (fd, password + password_len, (size_t) st.st_size - password_len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      nbdkit_error ("password-file: cannot read %s: %s", path, n < 0 ? strerror (errno) : "file shrank");
      close (fd);
      wipe_password ();
      return -1;
    }
    password_len += (size_t) n;
  }
  close (fd);
  if (password_len == 0) {
    nbdkit_error ("password-file: %s is empty", path);
    wipe_password ();
    return -1;
  }
  return 0;
}

static int
parse_bool (const char *key, const char *value, bool *out)
{
  int r = nbdkit_parse_bool (value);
  if (r < 0)
    return -1; /* nbdkit_parse_bool reported it */
  (void) key;
  *out = r;
  return 0;
}

static int
qcow2rs_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (filename);
    filename = nbdkit_realpath (value);
    return filename ? 0 : -1;
  }
  if (strcmp (key, "password-file") == 0)
    return read_password_file (value);
  if (strcmp (key, "password") == 0) {
    char *pw;
    wipe_password ();
    if (nbdkit_read_password (value, &pw) < 0)
      return -1;
    password_len = strlen (pw);
    password = (uint8_t *) pw;
    return 0;
  }
  if (strcmp (key, "readonly") == 0)
    return parse_bool (key, value, &readonly);
  if (strcmp (key, "force-share") == 0)
    return parse_bool (key, value, &force_share);
  if (strcmp (key, "backing") == 0) {
    bool backing;
    if (parse_bool (key, value, &backing) < 0)
      return -1;
    no_backing = !backing;
    return 0;
  }
  if (strcmp (key, "cache") == 0) {
    static const struct { const char *name; qcow2_cache_mode mode; } modes[] = {
      { "writeback", QCOW2_CACHE_WRITEBACK }, { "writethrough", QCOW2_CACHE_WRITETHROUGH },
      { "none", QCOW2_CACHE_NONE }, { "directsync", QCOW2_CACHE_DIRECTSYNC },
      { "unsafe", QCOW2_CACHE_UNSAFE },
    };
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++)
      if (strcmp (value, modes[i].name) == 0) {
        cache_mode = modes[i].mode;
        return 0;
      }
    nbdkit_error ("cache=%s: want writeback, writethrough, none, directsync or unsafe", value);
    return -1;
  }
  nbdkit_error ("unknown parameter '%s' (see nbdkit qcow2rs --help)", key);
  return -1;
}

static int
qcow2rs_config_complete (void)
{
  if (!filename) {
    nbdkit_error ("you must give the image: file=DISK.qcow2");
    return -1;
  }
  if (force_share && !readonly) {
    nbdkit_error ("force-share=true needs readonly=true");
    return -1;
  }
  return 0;
}

#define qcow2rs_config_help \
  "file=<IMAGE>          (required) The qcow2 image to serve.\n" \
  "password-file=<PATH>  Password of an encrypted image: the file's bytes.\n" \
  "password=<PASSWORD>   Or: -, +FILE, -FD as nbdkit reads passwords.\n" \
  "readonly=true         Open the image read-only.\n" \
  "force-share=true      With readonly: open while another program writes it.\n" \
  "backing=false         Do not open the backing chain.\n" \
  "cache=<MODE>          writeback (default), writethrough, none, directsync, unsafe."

static void
qcow2rs_dump_plugin (void)
{
  printf ("qcow2rs_version=%s\n", qcow2_version ());
}

static int
qcow2rs_get_ready (void)
{
  qcow2_open_options opts;
  qcow2_image_info info;
  qcow2_error r;

  qcow2_open_options_init (&opts);
  opts.flags = (readonly ? QCOW2_OPEN_RDONLY : 0) | (force_share ? QCOW2_OPEN_FORCE_SHARE : 0) |
               (no_backing ? QCOW2_OPEN_NO_BACKING : 0);
  opts.cache_mode = cache_mode;
  opts.password = password;
  opts.password_len = password_len;
  r = qcow2_open_ex (filename, &opts, &image);
  wipe_password ();
  if (r != QCOW2_OK) {
    image = NULL;
    return fail ("open", r);
  }
  r = qcow2_info (image, &info);
  if (r != QCOW2_OK)
    return fail ("info", r);
  is_v3 = info.compat >= QCOW2_COMPAT_V3;
  if (info.read_only && !readonly) {
    nbdkit_debug ("qcow2rs: %s is open read-only (corrupt bit?): serving it read-only", filename);
    readonly = true;
  }
  return 0;
}

static void
qcow2rs_cleanup (void)
{
  if (image) {
    qcow2_error r = qcow2_close (image);
    image = NULL;
    if (r != QCOW2_OK)
      fail ("close", r);
  }
}

static void
qcow2rs_unload (void)
{
  wipe_password ();
  free (filename);
  filename = NULL;
}

static void *
qcow2rs_open (int nbd_readonly)
{
  (void) nbd_readonly;
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
qcow2rs_get_size (void *handle)
{
  uint64_t size;
  qcow2_error r = qcow2_virtual_size (image, &size);
  (void) handle;
  if (r != QCOW2_OK)
    return fail ("virtual size", r);
  return (int64_t) size;
}

static int
qcow2rs_can_write (void *handle)
{
  (void) handle;
  return !readonly;
}

static int
qcow2rs_can_flush (void *handle)
{
  (void) handle;
  return 1;
}

static int
qcow2rs_can_trim (void *handle)
{
  (void) handle;
  return !readonly;
}

static int
qcow2rs_can_zero (void *handle)
{
  (void) handle;
  return !readonly;
}

static int
qcow2rs_can_fast_zero (void *handle)
{
  (void) handle;
  return is_v3;
}

static int
qcow2rs_can_fua (void *handle)
{
  (void) handle;
  return cache_mode == QCOW2_CACHE_WRITETHROUGH || cache_mode == QCOW2_CACHE_DIRECTSYNC
         ? NBDKIT_FUA_NATIVE : NBDKIT_FUA_EMULATE;
}

static int
qcow2rs_can_multi_conn (void *handle)
{
  (void) handle;
  return 1;
}

static int
qcow2rs_can_extents (void *handle)
{
  (void) handle;
  return 1;
}

static int
qcow2rs_is_rotational (void *handle)
{
  (void) handle;
  return 0;
}

static int
qcow2rs_pread (void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  qcow2_error r = qcow2_read (image, offset, buf, count);
  (void) handle;
  (void) flags;
  return r == QCOW2_OK ? 0 : fail ("read", r);
}

/* With native FUA (write-through modes) every write is durable when it returns. */
static int
qcow2rs_pwrite (void *handle, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  qcow2_error r = qcow2_write (image, offset, buf, count);
  (void) handle;
  (void) flags;
  return r == QCOW2_OK ? 0 : fail ("write", r);
}

static int
qcow2rs_flush (void *handle, uint32_t flags)
{
  qcow2_error r = qcow2_flush (image);
  (void) handle;
  (void) flags;
  return r == QCOW2_OK ? 0 : fail ("flush", r);
}

static int
qcow2rs_trim (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  qcow2_error r = qcow2_discard (image, offset, count);
  (void) handle;
  (void) flags;
  return r == QCOW2_OK ? 0 : fail ("trim", r);
}

static int
qcow2rs_zero (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  qcow2_error r;
  (void) handle;
  /* can_fast_zero is false for v2 images, so nbdkit refuses NBDKIT_FLAG_FAST_ZERO there itself. */
  (void) flags;
  r = qcow2_write_zeroes (image, offset, count);
  return r == QCOW2_OK ? 0 : fail ("zero", r);
}

static int
qcow2rs_extents (void *handle, uint32_t count, uint64_t offset, uint32_t flags,
                 struct nbdkit_extents *extents)
{
  qcow2_map_entry entries[64];
  uint64_t end = offset + count;
  (void) handle;

  /* NBD lets a reply cover less than was asked (the client asks again from where it ends): stop
   * after 16 batches, so a very fragmented image does not make one request map gigabytes. */
  for (int batch = 0; batch < 16 && offset < end; batch++) {
    size_t n = 0;
    qcow2_error r = qcow2_map (image, offset, end - offset, entries, 64, &n);
    if (r != QCOW2_OK)
      return fail ("block status", r);
    if (n == 0)
      break;
    for (size_t i = 0; i < n; i++) {
      uint32_t type = (entries[i].data ? 0 : NBDKIT_EXTENT_HOLE) |
                      (entries[i].zero ? NBDKIT_EXTENT_ZERO : 0);
      if (nbdkit_add_extent (extents, entries[i].start, entries[i].length, type) < 0)
        return -1;
      if (flags & NBDKIT_FLAG_REQ_ONE)
        return 0;
    }
    offset = entries[n - 1].start + entries[n - 1].length;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "qcow2rs",
  .longname = "nbdkit qcow2rs plugin (qcow2 images, LUKS encryption)",
  .version = "0.1.0",
  .magic_config_key = "file",
  .config = qcow2rs_config,
  .config_complete = qcow2rs_config_complete,
  .config_help = qcow2rs_config_help,
  .dump_plugin = qcow2rs_dump_plugin,
  .get_ready = qcow2rs_get_ready,
  .cleanup = qcow2rs_cleanup,
  .unload = qcow2rs_unload,
  .open = qcow2rs_open,
  .get_size = qcow2rs_get_size,
  .can_write = qcow2rs_can_write,
  .can_flush = qcow2rs_can_flush,
  .can_trim = qcow2rs_can_trim,
  .can_zero = qcow2rs_can_zero,
  .can_fast_zero = qcow2rs_can_fast_zero,
  .can_fua = qcow2rs_can_fua,
  .can_multi_conn = qcow2rs_can_multi_conn,
  .can_extents = qcow2rs_can_extents,
  .is_rotational = qcow2rs_is_rotational,
  .pread = qcow2rs_pread,
  .pwrite = qcow2rs_pwrite,
  .flush = qcow2rs_flush,
  .trim = qcow2rs_trim,
  .zero = qcow2rs_zero,
  .extents = qcow2rs_extents,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)

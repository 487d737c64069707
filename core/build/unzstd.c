/*
 * The initrd's "zstd": decompression only, from standard input to standard output,
 * with libzstd's streaming API (linked statically from Debian's libzstd-dev, so only
 * its decompressor comes along).  It takes what the agent runs (slim.agent.ee and
 * slim.agent.sync) and refuses anything else:
 *
 *     zstd -d [-c] [-q] [--patch-from=FILE]  <in  >out
 *
 * -c and -q change nothing (output always goes to standard output; only errors are
 * printed).  --patch-from=FILE: FILE is the reference a delta was made against
 * (zstd --patch-from when compressing), given to each frame as its prefix.
 *
 * Frames are checked as zstd checks them (their checksums when they carry one), and a
 * frame may ask for a window of at most 128 MiB, as zstd allows without --long, or
 * twice the reference with --patch-from.  On any error it says so on standard error
 * and exits 1; on success 0.  Built by slim.core.build.unzstd.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zstd.h>

#define WINDOW_LOG_DEFAULT 27 /* 128 MiB, zstd's limit without --long */
#define WINDOW_LOG_LIMIT 31   /* zstd's largest on 64-bit systems */

static int fail(const char *what, const char *why) {
    fprintf(stderr, "zstd: %s: %s\n", what, why);
    return 1;
}

static int write_all(const char *data, size_t size) {
    while (size > 0) {
        ssize_t n = write(STDOUT_FILENO, data, size);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += n;
        size -= (size_t)n;
    }
    return 0;
}

/* The whole of FILE in memory (a manifest: megabytes at most); NULL with *why set. */
static char *read_file(const char *path, size_t *size, const char **why) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        *why = strerror(errno);
        if (fd >= 0) close(fd);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        *why = "not a regular file";
        close(fd);
        return NULL;
    }
    char *buf = malloc(st.st_size ? (size_t)st.st_size : 1);
    size_t got = 0;
    *why = buf == NULL ? strerror(ENOMEM) : NULL;
    while (buf != NULL && got < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            *why = n < 0 ? strerror(errno) : "it became shorter while it was read";
            free(buf);
            buf = NULL;
            break;
        }
        got += (size_t)n;
    }
    close(fd);
    *size = got;
    return buf;
}

int main(int argc, char **argv) {
    const char *patch_from = NULL;
    int decompress = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--patch-from=", 13) == 0 && a[13] != '\0') {
            patch_from = a + 13;
        } else if (a[0] == '-' && a[1] != '-' && a[1] != '\0') {
            for (const char *c = a + 1; *c; c++) {
                if (*c == 'd') decompress = 1;
                else if (*c != 'c' && *c != 'q') return fail(a, "unknown option (this zstd only decompresses: -d [-c] [-q] [--patch-from=FILE])");
            }
        } else {
            return fail(a, "unknown argument (this zstd only decompresses standard input: -d [-c] [-q] [--patch-from=FILE])");
        }
    }
    if (!decompress) return fail("no -d", "this zstd only decompresses: -d [-c] [-q] [--patch-from=FILE]");

    char *prefix = NULL;
    size_t prefix_size = 0;
    int window_log = WINDOW_LOG_DEFAULT;
    if (patch_from != NULL) {
        const char *why = NULL;
        prefix = read_file(patch_from, &prefix_size, &why);
        if (prefix == NULL) return fail(patch_from, why);
        while (window_log < WINDOW_LOG_LIMIT && ((size_t)1 << window_log) < 2 * prefix_size) window_log++;
    }
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    size_t in_size = ZSTD_DStreamInSize(), out_size = ZSTD_DStreamOutSize();
    char *in_buf = malloc(in_size), *out_buf = malloc(out_size);
    if (dctx == NULL || in_buf == NULL || out_buf == NULL) return fail("memory", strerror(ENOMEM));
    size_t rc = ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, window_log);
    if (ZSTD_isError(rc)) return fail("window", ZSTD_getErrorName(rc));
    int frame_start = 1; /* the next byte begins a frame: the reference is given to it */
    int got_any = 0;
    size_t last = 0;     /* 0: at a frame's end (nothing pending) */
    for (;;) {
        ssize_t n = read(STDIN_FILENO, in_buf, in_size);
        if (n < 0) {
            if (errno == EINTR) continue;
            return fail("standard input", strerror(errno));
        }
        if (n == 0) break;
        got_any = 1;
        ZSTD_inBuffer in = {in_buf, (size_t)n, 0};
        while (in.pos < in.size) {
            if (frame_start && prefix != NULL) {
                rc = ZSTD_DCtx_refPrefix(dctx, prefix, prefix_size);
                if (ZSTD_isError(rc)) return fail(patch_from, ZSTD_getErrorName(rc));
            }
            frame_start = 0;
            ZSTD_outBuffer out = {out_buf, out_size, 0};
            last = ZSTD_decompressStream(dctx, &out, &in);
            if (ZSTD_isError(last)) return fail("standard input", ZSTD_getErrorName(last));
            if (write_all(out_buf, out.pos) != 0) return fail("standard output", strerror(errno));
            if (last == 0) frame_start = 1;
        }
    }
    if (!got_any) return fail("standard input", "empty: no zstd frame in it");
    /* what the decoder still holds for the last frame */
    for (;;) {
        ZSTD_inBuffer in = {in_buf, 0, 0};
        ZSTD_outBuffer out = {out_buf, out_size, 0};
        if (last == 0) break;
        last = ZSTD_decompressStream(dctx, &out, &in);
        if (ZSTD_isError(last)) return fail("standard input", ZSTD_getErrorName(last));
        if (write_all(out_buf, out.pos) != 0) return fail("standard output", strerror(errno));
        if (out.pos == 0 && last != 0) return fail("standard input", "truncated: the last frame is incomplete");
    }
    ZSTD_freeDCtx(dctx);
    free(prefix);
    free(in_buf);
    free(out_buf);
    return 0;
}

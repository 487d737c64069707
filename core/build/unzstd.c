/*
 * The initrd's "zstd": decompression only, from standard input to standard output,
 * with libzstd's streaming API (linked statically from Debian's libzstd-dev, so only
 * its decompressor comes along).  It takes what the agent runs (slim.agent.ee and
 * slim.agent.sync) and refuses anything else:
 *
 *     zstd -d [-c] [-q] [--patch-from=FILE] [--sha256=HEX]  <in  >out
 *
 * -c and -q change nothing (output always goes to standard output; only errors are
 * printed).  --patch-from=FILE: FILE is the reference a delta was made against
 * (zstd --patch-from when compressing), given to each frame as its prefix.
 * --sha256=HEX: the input's SHA-256 must be HEX (64 lowercase hex digits), checked with
 * Nettle's (linked statically from Debian's nettle-dev; SHA-NI where the CPU has it) as
 * the input is read, in this process: the agent streams an archive here as it arrives
 * and does not hash it again in Python (slim.agent.ee).  The output is only good when
 * the exit status is 0; its input is read to the end even when it cannot be decoded, or
 * when the reader closed the output (it stops decoding then: it does not write out
 * what a lying sender compressed 30,000 to 1), so that a damaged download is reported
 * as such.
 *
 * Frames are checked as zstd checks them (their checksums when they carry one), and a
 * frame may ask for a window of at most 128 MiB, as zstd allows without --long, or
 * twice the reference with --patch-from.  On any error it says so on standard error
 * and exits 1, or 2 when the input is not the one --sha256 names, or 3 when (with
 * --sha256, the input the one named) the reader closed the output first; on success 0.
 * Built by slim.core.build.unzstd.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nettle/sha2.h>
#include <zstd.h>

#define WINDOW_LOG_DEFAULT 27 /* 128 MiB, zstd's limit without --long */
#define WINDOW_LOG_LIMIT 31   /* zstd's largest on 64-bit systems */

#define USAGE "-d [-c] [-q] [--patch-from=FILE] [--sha256=HEX]"
#define EXIT_DIGEST 2 /* the input is not the one --sha256 names */
#define EXIT_CLOSED 3 /* with --sha256: the reader closed the output first (the input is the one named) */

static int fail(const char *what, const char *why) {
    fprintf(stderr, "zstd: %s: %s\n", what, why);
    return 1;
}

/* HEX as 32 bytes into out: 0, or -1 unless it is 64 lowercase hex digits. */
static int parse_sha256(const char *hex, uint8_t *out) {
    static const char digits[] = "0123456789abcdef";
    if (strlen(hex) != 2 * SHA256_DIGEST_SIZE) return -1;
    for (int i = 0; i < SHA256_DIGEST_SIZE; i++) {
        const char *hi = strchr(digits, hex[2 * i]), *lo = strchr(digits, hex[2 * i + 1]);
        if (hex[2 * i] == '\0' || hex[2 * i + 1] == '\0' || hi == NULL || lo == NULL) return -1;
        out[i] = (uint8_t)((hi - digits) << 4 | (lo - digits));
    }
    return 0;
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
    int decompress = 0, check = 0;
    uint8_t want[SHA256_DIGEST_SIZE], got[SHA256_DIGEST_SIZE];
    struct sha256_ctx sha;
    sha256_init(&sha);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--patch-from=", 13) == 0 && a[13] != '\0') {
            patch_from = a + 13;
        } else if (strncmp(a, "--sha256=", 9) == 0) {
            if (parse_sha256(a + 9, want) != 0) return fail(a, "not 64 lowercase hex digits");
            check = 1;
        } else if (a[0] == '-' && a[1] != '-' && a[1] != '\0') {
            for (const char *c = a + 1; *c; c++) {
                if (*c == 'd') decompress = 1;
                else if (*c != 'c' && *c != 'q') return fail(a, "unknown option (this zstd only decompresses: " USAGE ")");
            }
        } else {
            return fail(a, "unknown argument (this zstd only decompresses standard input: " USAGE ")");
        }
    }
    if (!decompress) return fail("no -d", "this zstd only decompresses: " USAGE);
    if (check) signal(SIGPIPE, SIG_IGN); /* a closed output is an error to report, after the digest */

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
    const char *bad = NULL; /* why the input cannot be decoded (with --sha256: told after the digest) */
    const char *bad_at = "standard input";
    int closed = 0; /* the reader closed the output (with --sha256) */
    for (;;) {
        ssize_t n = read(STDIN_FILENO, in_buf, in_size);
        if (n < 0) {
            if (errno == EINTR) continue;
            return fail("standard input", strerror(errno));
        }
        if (n == 0) break;
        got_any = 1;
        if (check) sha256_update(&sha, (size_t)n, (const uint8_t *)in_buf);
        ZSTD_inBuffer in = {in_buf, (size_t)n, 0};
        while (bad == NULL && in.pos < in.size) {
            if (frame_start && prefix != NULL) {
                rc = ZSTD_DCtx_refPrefix(dctx, prefix, prefix_size);
                if (ZSTD_isError(rc)) return fail(patch_from, ZSTD_getErrorName(rc));
            }
            frame_start = 0;
            ZSTD_outBuffer out = {out_buf, out_size, 0};
            last = ZSTD_decompressStream(dctx, &out, &in);
            if (ZSTD_isError(last)) {
                bad = ZSTD_getErrorName(last);
                break;
            }
            if (write_all(out_buf, out.pos) != 0) {
                if (!check) return fail("standard output", strerror(errno));
                bad_at = "standard output", bad = "closed before the end", closed = 1; /* the rest: hashed */
                break;
            }
            if (last == 0) frame_start = 1;
        }
        if (bad != NULL && !check) return fail(bad_at, bad);
    }
    if (bad == NULL && !got_any) bad = "empty: no zstd frame in it";
    /* what the decoder still holds for the last frame */
    while (bad == NULL && last != 0) {
        ZSTD_inBuffer in = {in_buf, 0, 0};
        ZSTD_outBuffer out = {out_buf, out_size, 0};
        last = ZSTD_decompressStream(dctx, &out, &in);
        if (ZSTD_isError(last)) {
            bad = ZSTD_getErrorName(last);
            break;
        }
        if (write_all(out_buf, out.pos) != 0) {
            if (!check) return fail("standard output", strerror(errno));
            bad_at = "standard output", bad = "closed before the end", closed = 1;
            break;
        }
        if (out.pos == 0 && last != 0) bad = "truncated: the last frame is incomplete";
    }
    if (check) {
        sha256_digest(&sha, SHA256_DIGEST_SIZE, got);
        if (memcmp(got, want, SHA256_DIGEST_SIZE) != 0) {
            char hex[2 * SHA256_DIGEST_SIZE + 1];
            for (int i = 0; i < SHA256_DIGEST_SIZE; i++) snprintf(hex + 2 * i, 3, "%02x", got[i]);
            fprintf(stderr, "zstd: standard input: its sha256 is %s, not the one --sha256 names\n", hex);
            return EXIT_DIGEST;
        }
    }
    if (bad != NULL) {
        fail(bad_at, bad);
        return closed ? EXIT_CLOSED : 1;
    }
    ZSTD_freeDCtx(dctx);
    free(prefix);
    free(in_buf);
    free(out_buf);
    return 0;
}

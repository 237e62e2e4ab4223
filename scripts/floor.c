/* A measuring instrument for scripts/bench, not a server: what proxyd's system calls
 * cost with no interpreter around them.
 *
 * It answers LSTAT, OPEN, READLINK, LGETXATTR and CHMOD (the requests of the bench's
 * "floor" figure) on the connection given with -f, chrooted into the export given
 * with -p (the reference's command line), making exactly the calls a proxyd worker
 * makes for them: one recv(2) per request, the request's own calls (OPEN: stat, open,
 * fstat, sendmsg, close), one send(2) of the reply, with no receive timeout, and with
 * proxyd's seccomp filter loaded when $FLOOR_FILTER names a file holding its program
 * (proxyd.privileges.syscall_filter). No checks beyond what the bench's requests need:
 * never run it on anything but the bench's own exports.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

enum { T_OPEN = 2, T_LSTAT = 8, T_READLINK = 9, T_CHMOD = 11, T_LGETXATTR = 17 };
enum { HEADER = 8, MAX_PAYLOAD = 64 * 1024 };

static unsigned char in[HEADER + MAX_PAYLOAD];
static unsigned char out[HEADER + MAX_PAYLOAD];
static char path[MAX_PAYLOAD], name[MAX_PAYLOAD], value[MAX_PAYLOAD];

static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static void put32(size_t off, uint32_t v) { memcpy(out + off, &v, 4); }
static void put64(size_t off, uint64_t v) { memcpy(out + off, &v, 8); }

/* The string at p (u16 length, bytes) into dst, NUL-terminated; its size on the wire. */
static size_t string_at(const unsigned char *p, char *dst)
{
    uint16_t n;
    memcpy(&n, p, 2);
    memcpy(dst, p + 2, n);
    dst[n] = 0;
    return 2 + n;
}

/* A status reply: SUCCESS with value >= 0, ERROR with -errno. Its length. */
static size_t status(int32_t value)
{
    put32(0, value < 0);
    put32(4, 4);
    memcpy(out + 8, &value, 4);
    return 12;
}

static size_t string_data(const char *s, size_t n)
{
    uint16_t m = n;
    put32(0, 0);
    put32(4, n + 2);
    memcpy(out + 8, &m, 2);
    memcpy(out + 10, s, n);
    return 10 + n;
}

static size_t stat_reply(const struct stat *st)
{
    put32(0, 0);
    put32(4, 116);
    put64(8, st->st_dev);
    put64(16, st->st_ino);
    put64(24, st->st_nlink);
    put32(32, st->st_mode);
    put32(36, st->st_uid);
    put32(40, st->st_gid);
    put64(44, st->st_rdev);
    put64(52, st->st_size);
    put64(60, st->st_blksize);
    put64(68, st->st_blocks);
    put64(76, st->st_atim.tv_sec);
    put64(84, st->st_atim.tv_nsec);
    put64(92, st->st_mtim.tv_sec);
    put64(100, st->st_mtim.tv_nsec);
    put64(108, st->st_ctim.tv_sec);
    put64(116, st->st_ctim.tv_nsec);
    return 124;
}

/* OPEN as a proxyd worker makes it: look, open, look at what was opened, send. */
static void open_reply(int conn, const unsigned char *payload)
{
    int32_t flags, answer;
    struct stat st;
    memcpy(&flags, payload + string_at(payload, path), 4);
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
        answer = -ENXIO;
        send(conn, &answer, 4, MSG_NOSIGNAL);
        return;
    }
    int fd = open(path, flags | O_NOCTTY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) != 0) {
        answer = -errno;
        send(conn, &answer, 4, MSG_NOSIGNAL);
        return;
    }
    answer = 0x7FFFFFFF; /* FD_VALID, the descriptor beside it */
    char control[CMSG_SPACE(sizeof fd)] = {0};
    struct iovec iov = {&answer, 4};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fd);
    memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);
    sendmsg(conn, &msg, MSG_NOSIGNAL);
    close(fd);
}

static size_t reply_to(uint32_t type, const unsigned char *payload)
{
    struct stat st;
    int32_t size, mode;
    ssize_t n;
    switch (type) {
    case T_LSTAT:
        string_at(payload, path);
        return lstat(path, &st) ? status(-errno) : stat_reply(&st);
    case T_READLINK:
        memcpy(&size, payload + string_at(payload, path), 4);
        n = readlink(path, value, size < MAX_PAYLOAD - 2 ? size : MAX_PAYLOAD - 2);
        return n < 0 ? status(-errno) : string_data(value, n);
    case T_LGETXATTR:
        memcpy(&size, payload, 4);
        size = size < MAX_PAYLOAD - 2 ? size : MAX_PAYLOAD - 2;
        string_at(payload + 4 + string_at(payload + 4, path), name);
        n = lgetxattr(path, name, size ? value : NULL, size);
        return n < 0 ? status(-errno) : size ? string_data(value, n) : status(n);
    case T_CHMOD:
        memcpy(&mode, payload + string_at(payload, path), 4);
        return status(chmod(path, mode) ? -errno : 0);
    default:
        return status(-EOPNOTSUPP);
    }
}

/* proxyd's seccomp program from `file` (read before the chroot). Its length in
 * instructions. */
static unsigned short read_filter(const char *file, struct sock_filter *program, size_t room)
{
    int fd = open(file, O_RDONLY);
    ssize_t size = fd < 0 ? -1 : read(fd, program, room);
    if (size <= 0 || size % sizeof program[0]) {
        fprintf(stderr, "floor: cannot read a BPF program from %s\n", file);
        exit(1);
    }
    close(fd);
    return size / sizeof program[0];
}

static void load_filter(struct sock_filter *program, unsigned short length)
{
    struct sock_fprog prog = {length, program};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW, &prog)) {
        perror("floor: seccomp");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    const char *export = NULL, *filter = getenv("FLOOR_FILTER");
    int conn = -1;
    for (int i = 1; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "-p"))
            export = argv[++i];
        else if (!strcmp(argv[i], "-f"))
            conn = atoi(argv[++i]);
    }
    static struct sock_filter program[4096];
    unsigned short length = filter ? read_filter(filter, program, sizeof program) : 0;
    if (!export || conn < 0 || chroot(export) || chdir("/")) {
        fprintf(stderr, "usage: floor -p EXPORT -f FD (as root)\n");
        return 2;
    }
    umask(0);
    if (length)
        load_filter(program, length);
    for (;;) {
        ssize_t have = recv(conn, in, sizeof in, 0);
        if (have <= 0)
            return 0;
        while (have < HEADER || (size_t)have < HEADER + get32(in + 4)) {
            ssize_t more = recv(conn, in + have, sizeof in - have, 0);
            if (more <= 0)
                return 0;
            have += more;
        }
        uint32_t type = get32(in);
        if (type == T_OPEN) {
            open_reply(conn, in + HEADER);
            continue;
        }
        if (send(conn, out, reply_to(type, in + HEADER), MSG_NOSIGNAL) < 0)
            return 0;
    }
}

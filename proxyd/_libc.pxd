# C declarations for the compiled request path (proxyd/ops.py, proxyd/server.py):
# the libc calls Cython's own posix/*.pxd do not declare. Used only where compiled
# (`if cython.compiled:`); the .py files fall back to os and socket interpreted.

cdef extern from "<sys/types.h>":
    ctypedef long ssize_t

cdef extern from "<sys/uio.h>":
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *)
    unsigned char *CMSG_DATA(cmsghdr *)
    size_t CMSG_SPACE(size_t)
    size_t CMSG_LEN(size_t)
    int SOL_SOCKET
    int SCM_RIGHTS
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    ssize_t recv(int, void *, size_t, int)
    ssize_t send(int, const void *, size_t, int)
    ssize_t sendmsg(int, const msghdr *, int)
    int SO_RCVTIMEO
    int setsockopt(int, int, int, const void *, socklen_t) nogil  # in a signal handler

cdef extern from "<poll.h>":
    struct pollfd:
        int fd
        short events
        short revents
    short POLLOUT
    int poll(pollfd *, unsigned long, int)

cdef extern from "<sys/xattr.h>":
    ssize_t lgetxattr(const char *, const char *, void *, size_t)
    ssize_t llistxattr(const char *, char *, size_t)
    int lsetxattr(const char *, const char *, const void *, size_t, int)
    int lremovexattr(const char *, const char *)

cdef extern from "<unistd.h>":
    int linkat(int, const char *, int, const char *, int)

cdef extern from "<sys/vfs.h>":
    ctypedef struct fsid_t:
        pass
    struct statfs:
        long f_type
        long f_bsize
        unsigned long f_blocks
        unsigned long f_bfree
        unsigned long f_bavail
        unsigned long f_files
        unsigned long f_ffree
        fsid_t f_fsid
        long f_namelen
        long f_frsize
    int c_statfs "statfs"(const char *, statfs *)

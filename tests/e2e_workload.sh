# End-to-end workload: runs as /workload.sh in the test guest (busybox sh), cwd = the 9p mount.
# One line per step, "OK step" or "FAIL step detail"; exits non-zero if any step failed.
# Everything under scratch/ is removed at the end; keep/ stays for the host to inspect
# (see check_host_tree in tests/test_e2e_guest.py, which must agree with this file).
#
# Parameters: variables set by lines that tests/test_e2e_guest.py puts before this text.
#   E2E_DIR=NAME    work in the sub-directory NAME of the share (created), not its top:
#                   several guests can share one export.
#   E2E_PAUSE=SECS  at each "pause NAME" below, print "GUEST-PAUSE NAME" and sleep SECS
#                   without touching the share, so that the host can act (kill the worker
#                   serving this guest) while no request is in flight. Unset: no pauses.
#
# What the guest cannot reach, so it is not here: xattrs (busybox has no setfattr/getfattr),
# and opening device nodes or FIFOs on the server: the guest kernel opens those itself
# (cat on a 9p char device 1:3 reads the guest's own /dev/null), so the server never sees it.

failures=0
ok() { echo "OK $1"; }
fail() {
    echo "FAIL $*"
    failures=$((failures + 1))
}
# check STEP CMD...: the command must succeed.
check() {
    step=$1
    shift
    if out=$("$@" 2>&1); then ok "$step"; else fail "$step" "'$*' failed: $out"; fi
}
# refuse STEP CMD...: the command must fail.
refuse() {
    step=$1
    shift
    if out=$("$@" 2>&1); then fail "$step" "'$*' succeeded: $out"; else ok "$step"; fi
}
# expect STEP WANT CMD...: the command's output must be WANT.
expect() {
    step=$1 want=$2
    shift 2
    got=$("$@" 2>&1)
    if [ "$got" = "$want" ]; then ok "$step"; else fail "$step" "'$*' gave '$got', want '$want'"; fi
}

# pause NAME: see E2E_PAUSE above. The host reacts to the line within milliseconds.
pause() {
    [ -n "${E2E_PAUSE:-}" ] || return 0
    echo "GUEST-PAUSE $1"
    sleep "$E2E_PAUSE"
    echo "GUEST-RESUME $1"
}

if [ -n "${E2E_DIR:-}" ]; then
    if mkdir -p "$E2E_DIR" && cd "$E2E_DIR"; then ok workdir; else fail workdir "$E2E_DIR"; fi
    [ $failures -eq 0 ] || exit 1
fi
rm -rf keep scratch
check mkdir mkdir keep scratch

# Create, write, append, read back, overwrite in the middle.
echo hello >keep/hello.txt
echo world >>keep/hello.txt
expect read "hello
world" cat keep/hello.txt
expect create-mode 644 stat -c %a keep/hello.txt # umask 022 applied by the guest
printf 'abcdef' >scratch/patch
printf 'XY' | dd of=scratch/patch bs=1 seek=2 conv=notrunc 2>/dev/null
expect write-at-offset abXYef cat scratch/patch
expect read-at-offset XYe dd if=scratch/patch bs=1 skip=2 count=3 status=none
refuse read-missing cat scratch/missing
# O_EXCL through the shell's noclobber.
refuse create-excl sh -c 'set -C; echo x >keep/hello.txt'

# A big file: written through the share, read back, compared with the original. The host
# compares BIG-SHA256 with its copy.
dd if=/dev/urandom of=/tmp/big bs=1M count=8 status=none
want=$(sha256sum </tmp/big)
want=${want%% *}
check big-write cp /tmp/big keep/big.bin
# Held open across both pauses (QEMU holds the descriptor the server opened), read at the end.
command exec 4<keep/hello.txt || fail hold-fd # "command": a failed exec must not end the shell
pause kill-1
got=$(sha256sum <keep/big.bin)
got=${got%% *}
if [ "$got" = "$want" ]; then ok big-read; else fail big-read "sha256 $got, want $want"; fi
echo "BIG-SHA256=$want"
expect big-size 8388608 stat -c %s keep/big.bin
a=$(dd if=/tmp/big bs=4096 skip=1234 count=3 status=none | md5sum)
b=$(dd if=keep/big.bin bs=4096 skip=1234 count=3 status=none | md5sum)
if [ "$a" = "$b" ]; then ok big-read-middle; else fail big-read-middle "$b, want $a"; fi

# A file that is still open keeps working after unlink (QEMU holds the server's fd).
echo open >scratch/unlinked
command exec 3<scratch/unlinked || fail open-unlinked
rm scratch/unlinked
expect read-after-unlink open cat <&3
exec 3<&-

# Directories: nested, listing, many entries, odd names, removal rules.
check mkdir-nested mkdir -p scratch/d1/d2/d3
check mkdir-mode mkdir -m 711 keep/dir711
expect mkdir-mode-stat 711 stat -c %a keep/dir711
refuse mkdir-exists mkdir keep/dir711
i=0
while [ $i -lt 100 ]; do
    # Not ":": a failed redirection of a special built-in would end this shell, silently.
    true >scratch/d1/file-$i || fail readdir-create "file-$i"
    i=$((i + 1))
done
pause kill-2
expect readdir-many 101 sh -c 'ls scratch/d1 | wc -l'
long=$(printf 'n%.0s' $(seq 255)) # NAME_MAX
check name-max touch "keep/$long"
refuse name-too-long touch "keep/${long}x"
odd=$(printf 'sp ace-\351-\001') # space, a byte that is not UTF-8, a control character
check name-bytes touch "keep/$odd"
# A glob, not ls: busybox ls shows unprintable bytes as "?".
expect name-bytes-readdir found sh -c 'for f in keep/*; do [ "$f" = "keep/$1" ] && echo found; done' \
    sh "$odd"
refuse rmdir-not-empty rmdir scratch/d1

# Rename: file, over an existing file, directory (with contents), missing source.
echo one >scratch/r1
echo two >scratch/r2
check rename-file mv scratch/r1 scratch/r3
refuse rename-old-gone test -e scratch/r1
check rename-over mv scratch/r2 scratch/r3
expect rename-over-content two cat scratch/r3
check rename-dir mv scratch/d1 keep/moved
check rename-dir-content test -d keep/moved/d2/d3 -a -f keep/moved/file-42
refuse rename-missing mv scratch/nope scratch/nope2

# Symlinks and hard links.
check symlink ln -s hello.txt keep/link
expect readlink hello.txt readlink keep/link
expect symlink-follow "hello
world" cat keep/link
expect symlink-type "symbolic link" stat -c %F keep/link
target=$(printf 't%.0s' $(seq 1000))
check symlink-long ln -s "$target" scratch/longlink
expect readlink-long "$target" readlink scratch/longlink
check hardlink ln keep/hello.txt keep/hello.hard
expect hardlink-count 2 stat -c %h keep/hello.txt
a=$(stat -c %i keep/hello.txt)
expect hardlink-inode "$a" stat -c %i keep/hello.hard

# Attributes: mode, owner (also of a symlink itself), times, size.
echo mode >keep/mode640
check chmod chmod 640 keep/mode640
expect chmod-stat 640 stat -c %a keep/mode640
check chmod-setuid chmod 4755 scratch/r3
expect chmod-setuid-stat 4755 stat -c %a scratch/r3
echo owned >keep/owned
check chown chown 1234:5678 keep/owned
expect chown-stat 1234:5678 stat -c %u:%g keep/owned
check chown-symlink chown -h 1234:5678 keep/link
expect chown-symlink-stat 1234:5678 stat -c %u:%g keep/link
expect chown-symlink-target 0:0 stat -L -c %u:%g keep/link
echo dated >keep/dated
check utime touch -d '2001-02-03 04:05:06' keep/dated
expect utime-stat "981173106 981173106" stat -c '%X %Y' keep/dated
echo mtime >keep/mtime-only
check utime-mtime-only touch -m -d '2002-02-03 04:05:06' keep/mtime-only
expect utime-mtime-only-stat 1012709106 stat -c %Y keep/mtime-only
# QEMU's proxy client sends the mtime's nanoseconds in place of the atime's UTIME_OMIT, so the
# atime is set too, to whatever seconds the guest left in the request: not checked, just shown.
echo "INFO mtime-only atime=$(stat -c %X keep/mtime-only)"
printf 'abcdef' >keep/sized
check truncate-grow truncate -s 10000 keep/sized
expect truncate-grow-stat 10000 stat -c %s keep/sized
expect truncate-grow-zeros 0 sh -c 'tail -c +7 keep/sized | tr -d "\000" | wc -c'
check truncate-shrink truncate -s 3 keep/sized
expect truncate-shrink-content abc cat keep/sized

# Special files: the server creates them; the guest uses them itself.
check mkfifo mkfifo keep/fifo
expect mkfifo-type fifo stat -c %F keep/fifo
check mknod mknod keep/null c 1 3
expect mknod-type "character special file 1 3" stat -c '%F %t %T' keep/null
expect mknod-open-local "" cat keep/null # the guest's own /dev/null, not the server's

# Another user: the server must create with the requester's uid/gid.
echo 'user1234:x:1234:5678::/tmp:/bin/sh' >>/etc/passwd
check mkdir-shared mkdir -m 777 keep/shared
check as-user su user1234 -c 'echo u >keep/shared/file && mkdir keep/shared/dir &&
    ln -s file keep/shared/link && mkfifo keep/shared/fifo'
for f in file dir link fifo; do
    expect as-user-owner-$f 1234:5678 stat -c %u:%g keep/shared/$f
done

expect read-held-fd "hello
world" cat <&4
exec 4<&-

# statfs.
check df df /mnt
blocks=$(stat -f -c %b .)
if [ "$blocks" -gt 0 ]; then ok statfs; else fail statfs "blocks=$blocks"; fi

# Remove the scratch tree; keep/ stays.
check rm-file rm scratch/r3
check rm-tree rm -r scratch
refuse rm-gone test -e scratch
check ls ls -la keep

echo "failures=$failures"
[ $failures -eq 0 ]

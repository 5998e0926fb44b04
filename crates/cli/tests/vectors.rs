//! Reads and writes of ioasid files as Linux's file operations take them:
//! every form of `readv` and `writev` taken apart a buffer at a time, as
//! the kernel does for files with `read` and `write` only; no positioned
//! form and no `lseek` on a queue; a position that `read` moves.

mod common;

use common::{Serve, run_c, run_c_args};

/// Two page requests waiting on a fault queue of a mock device, read and
/// answered through vectors; then what Linux refuses, and how.
const QUEUE_C: &str = r#"
#include <sys/uio.h>
struct response { __u32 cookie, code; };

int main(void) {
    alarm(20);
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    __u32 idev;
    int q = mock_with_fault_queue(fd, ioas_alloc(fd), &idev);
    page_request(fd, q, idev, 1, 0x1000);
    page_request(fd, q, idev, 2, 0x2000);
    struct pgfault got[3];
    memset(got, 0, sizeof(got));
    struct iovec v[3] = { { &got[0], sizeof(got[0]) }, { &got[1], sizeof(got[1]) }, { &got[2], sizeof(got[2]) } };

    /* Refused before any request is taken. No positioned form, whatever the
       offset; a negative one is EINVAL first. */
    CHECK(preadv(q, v, 3, 0) == -1 && errno == ESPIPE);
    CHECK(preadv(q, v, 3, -2) == -1 && errno == EINVAL);
    CHECK(pread(q, &got[0], sizeof(got[0]), 0) == -1 && errno == ESPIPE);
    CHECK(pwrite(q, &got[0], 8, 0) == -1 && errno == ESPIPE);
    CHECK(lseek(q, 0, SEEK_CUR) == -1 && errno == ESPIPE);
    /* The vector itself: too many buffers, a negative length, a bad array. */
    static struct iovec many[1025];
    volatile int minus_one = -1;
    CHECK(readv(q, many, 1025) == -1 && errno == EINVAL);
    CHECK(readv(q, v, minus_one) == -1 && errno == EINVAL);
    struct iovec negative[2] = { { &got[0], sizeof(got[0]) }, { &got[1], (size_t)-1 } };
    CHECK(readv(q, negative, 2) == -1 && errno == EINVAL);
    CHECK(readv(q, NULL, 1) == -1 && errno == EFAULT);
    CHECK(readv(q, NULL, 0) == 0);
    /* Flags a file without read_iter cannot take, unless nothing is asked. */
    CHECK(preadv2(q, v, 3, -1, RWF_NOWAIT) == -1 && errno == EOPNOTSUPP);
    struct iovec empty = { &got[0], 0 };
    CHECK(preadv2(q, &empty, 1, -1, RWF_NOWAIT) == 0);
    /* A first buffer that holds no whole request is ESPIPE, as read's. */
    struct iovec odd = { &got[0], sizeof(got[0]) + 8 };
    CHECK(readv(q, &odd, 1) == -1 && errno == ESPIPE);

    /* One request per buffer, and the call ends at the first buffer that
       fails or falls short, with what it has: a buffer holding no whole
       request after one that got one; a buffer that finds none. errno is
       left alone. */
    struct iovec mixed[2] = { { &got[0], sizeof(got[0]) }, { &got[1], sizeof(got[1]) + 8 } };
    errno = 1234;
    CHECK(readv(q, mixed, 2) == sizeof(got[0]));
    CHECK(errno == 1234);
    CHECK(preadv2(q, &v[1], 2, -1, 0) == sizeof(got[1]));
    CHECK(got[0].addr == 0x1000 && got[1].addr == 0x2000 && got[2].addr == 0);
    CHECK(got[0].cookie != got[1].cookie);

    /* Both answered in one vector, one response per buffer. */
    struct response answers[2] = { { got[0].cookie, 0 }, { got[1].cookie, 0 } };
    struct iovec w[2] = { { &answers[0], sizeof(answers[0]) }, { &answers[1], sizeof(answers[1]) } };
    CHECK(pwritev(q, w, 2, 0) == -1 && errno == ESPIPE);
    CHECK(writev(q, w, 2) == 2 * sizeof(answers[0]));
    /* Nothing waits now. */
    CHECK(readv(q, v, 3) == 0);
    /* A first buffer holding no whole response moves nothing. */
    struct iovec half[2] = { { &answers[0], 4 }, { &answers[1], 8 } };
    CHECK(writev(q, half, 2) == -1 && errno == ESPIPE);

    /* A forked child's vector reaches the queue it inherited. */
    page_request(fd, q, idev, 3, 0x3000);
    pid_t child = fork();
    if (child == 0) {
        CHECK(preadv(q, v, 3, 0) == -1 && errno == ESPIPE);
        CHECK(readv(q, v, 3) == sizeof(got[0]) && got[0].addr == 0x3000);
        _exit(0);
    }
    int status;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(readv(q, v, 3) == 0);
    printf("ok\n");
    return 0;
}
"#;

fn queue_program() -> String {
    format!("{}{QUEUE_C}", common::IOMMUFD_C)
}

#[test]
fn a_fault_queue_takes_vectors_a_buffer_at_a_time_and_no_offset() {
    run_c("vectors-queue", &queue_program());
}

#[test]
fn a_fault_queue_of_the_daemon_takes_vectors_as_linuxs_does() {
    let serve = Serve::start("vectors");
    run_c_args("vectors-queue-daemon", &queue_program(), &[], &["--socket", serve.socket()]);
}

/// `fail-nth`'s position moves as it is read, so a second `read` is at
/// the end; the positioned forms read where they are told, and a vector
/// goes on where its last buffer stopped.
const FAIL_NTH_C: &str = r#"
#include <sys/uio.h>
int main(void) {
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/task/%ld/fail-nth", (long)syscall(SYS_gettid));
    int nth = open(path, O_RDWR);
    CHECK(nth >= 0);
    CHECK(write(nth, "3", 1) == 1);
    char out[8] = {0};
    CHECK(read(nth, out, sizeof(out)) == 2 && !memcmp(out, "3\n", 2));
    CHECK(read(nth, out, sizeof(out)) == 0);
    CHECK(pread(nth, out, sizeof(out), 1) == 1 && out[0] == '\n');
    char a[1], b[4];
    struct iovec v[2] = { { a, 1 }, { b, 4 } };
    CHECK(preadv(nth, v, 2, 0) == 2 && a[0] == '3' && b[0] == '\n');
    CHECK(readv(nth, v, 2) == 0);
    CHECK(lseek(nth, 0, SEEK_SET) == -1 && errno == ESPIPE);
    /* A write leaves the position alone, as Linux's. */
    CHECK(pwrite(nth, "0", 1, 0) == 1);
    CHECK(read(nth, out, sizeof(out)) == 0);
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn fail_nth_reads_move_its_position() {
    run_c("vectors-fail-nth", &format!("{}{FAIL_NTH_C}", common::IOMMUFD_C));
}

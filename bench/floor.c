/* floor.c: the physical floor: a 64-byte round trip between two processes,
 * over a pipe pair and over a unix SOCK_STREAM socketpair (the transport the
 * core uses between the host and a worker), with both processes on one CPU,
 * on two different CPUs, and left to the scheduler.
 *
 * Last, the floor for bulk transfers: 10 MiB sent one way over a socketpair
 * (unpinned), the receiver answering with one byte once it has it all.
 *
 * Usage: floor [rounds [warmup [bulk_rounds]]]
 * Prints one line per case, times in nanoseconds:
 *   floor <transport> <placement> <n> <min> <median> <p99> <mean>
 *   floor socketpair bulk-10MiB <n> <min> <median> <p99> <mean>
 * or, when a placement is impossible (one CPU allowed):
 *   floor <transport> <placement> 0 - - - -
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MSG 64

static uint64_t fl_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int fl_read_full(int fd, char *p, size_t n) {
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r > 0) {
      p += r;
      n -= (size_t)r;
    } else if (r == 0 || errno != EINTR) {
      return -1;
    }
  }
  return 0;
}

static int fl_write_full(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t r = write(fd, p, n);
    if (r >= 0) {
      p += r;
      n -= (size_t)r;
    } else if (errno != EINTR) {
      return -1;
    }
  }
  return 0;
}

static int fl_cmp(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Pins the calling process to one CPU, or restores `all` when cpu < 0. */
static void fl_pin(int cpu, const cpu_set_t *all) {
  cpu_set_t set;
  if (cpu < 0) {
    sched_setaffinity(0, sizeof *all, all);
    return;
  }
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (sched_setaffinity(0, sizeof set, &set) != 0) {
    perror("floor: sched_setaffinity");
    exit(1);
  }
}

/* One case: the parent sends 64 bytes, the child echoes them back. */
static void fl_case(const char *transport, const char *placement, int pcpu, int ccpu,
                    const cpu_set_t *all, int rounds, int warmup) {
  int up[2], down[2]; /* parent writes down[1], child reads down[0]; back on up */
  int pw, pr, cw, cr;
  char buf[MSG];
  uint64_t *t = malloc(sizeof *t * (size_t)rounds);
  double sum = 0;
  pid_t pid;
  int i, status;

  if (t == NULL) exit(1);
  if (strcmp(transport, "pipe") == 0) {
    if (pipe(up) != 0 || pipe(down) != 0) { perror("floor: pipe"); exit(1); }
    pw = down[1]; cr = down[0]; cw = up[1]; pr = up[0];
  } else {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) { perror("floor: socketpair"); exit(1); }
    pw = pr = sv[0];
    cw = cr = sv[1];
  }
  memset(buf, 'x', sizeof buf);
  pid = fork();
  if (pid < 0) { perror("floor: fork"); exit(1); }
  if (pid == 0) {
    if (pw != cw) { close(pw); close(pr); } else { close(pw); }
    fl_pin(ccpu, all);
    for (;;) {
      if (fl_read_full(cr, buf, MSG) != 0) _exit(0);
      if (fl_write_full(cw, buf, MSG) != 0) _exit(1);
    }
  }
  if (pw != cw) { close(cw); close(cr); } else { close(cw); }
  fl_pin(pcpu, all);
  for (i = 0; i < warmup + rounds; i++) {
    uint64_t t0 = fl_now();
    if (fl_write_full(pw, buf, MSG) != 0 || fl_read_full(pr, buf, MSG) != 0) {
      fprintf(stderr, "floor: the echo process went away\n");
      exit(1);
    }
    if (i >= warmup) t[i - warmup] = fl_now() - t0;
  }
  close(pw);
  if (pr != pw) close(pr);
  waitpid(pid, &status, 0);
  fl_pin(-1, all);
  for (i = 0; i < rounds; i++) sum += (double)t[i];
  qsort(t, (size_t)rounds, sizeof *t, fl_cmp);
  printf("floor %s %s %d %llu %llu %llu %.0f\n", transport, placement, rounds,
         (unsigned long long)t[0], (unsigned long long)t[rounds / 2],
         (unsigned long long)t[(size_t)((double)rounds * 0.99)], sum / rounds);
  fflush(stdout);
  free(t);
}

/* 10 MiB one way over a socketpair; the reply is one byte. */
static void fl_bulk(int rounds) {
  const size_t size = 10u << 20;
  char *buf = malloc(size);
  uint64_t *t = malloc(sizeof *t * (size_t)rounds);
  double sum = 0;
  int sv[2], i, status, warmup = 3;
  pid_t pid;

  if (buf == NULL || t == NULL) exit(1);
  memset(buf, 'y', size);
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) { perror("floor: socketpair"); exit(1); }
  pid = fork();
  if (pid < 0) { perror("floor: fork"); exit(1); }
  if (pid == 0) {
    close(sv[0]);
    for (;;) {
      if (fl_read_full(sv[1], buf, size) != 0) _exit(0);
      if (fl_write_full(sv[1], buf, 1) != 0) _exit(1);
    }
  }
  close(sv[1]);
  for (i = 0; i < warmup + rounds; i++) {
    uint64_t t0 = fl_now();
    if (fl_write_full(sv[0], buf, size) != 0 || fl_read_full(sv[0], buf, 1) != 0) {
      fprintf(stderr, "floor: the bulk receiver went away\n");
      exit(1);
    }
    if (i >= warmup) t[i - warmup] = fl_now() - t0;
  }
  close(sv[0]);
  waitpid(pid, &status, 0);
  for (i = 0; i < rounds; i++) sum += (double)t[i];
  qsort(t, (size_t)rounds, sizeof *t, fl_cmp);
  printf("floor socketpair bulk-10MiB %d %llu %llu %llu %.0f\n", rounds,
         (unsigned long long)t[0], (unsigned long long)t[rounds / 2],
         (unsigned long long)t[(size_t)((double)rounds * 0.99)], sum / rounds);
  fflush(stdout);
  free(t);
  free(buf);
}

int main(int argc, char **argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 20000;
  int warmup = argc > 2 ? atoi(argv[2]) : 2000;
  int bulk = argc > 3 ? atoi(argv[3]) : 30;
  const char *transports[] = {"pipe", "socketpair"};
  cpu_set_t all;
  int cpus[2] = {-1, -1}, n = 0, c, k;

  if (rounds < 100) rounds = 100;
  if (bulk < 1) bulk = 1;
  signal(SIGPIPE, SIG_IGN);
  if (sched_getaffinity(0, sizeof all, &all) != 0) { perror("floor: sched_getaffinity"); return 1; }
  for (c = 0; c < CPU_SETSIZE && n < 2; c++)
    if (CPU_ISSET(c, &all)) cpus[n++] = c;
  for (k = 0; k < 2; k++) {
    fl_case(transports[k], "same-cpu", cpus[0], cpus[0], &all, rounds, warmup);
    if (n >= 2)
      fl_case(transports[k], "cross-cpu", cpus[0], cpus[1], &all, rounds, warmup);
    else
      printf("floor %s cross-cpu 0 - - - -\n", transports[k]);
    fl_case(transports[k], "free", -1, -1, &all, rounds, warmup);
  }
  fl_bulk(bulk);
  return 0;
}

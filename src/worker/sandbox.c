/* sandbox.c: the sandbox profile of a worker: a stripped Lua environment,
 * tight limits and a seccomp filter. SECURITY.md says what it covers. */
#include "sandbox.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <linux/capability.h>
#include <linux/landlock.h>
#include <lua.h>
#include <seccomp.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "wire.h"

/* Sets to nil every field of the table at `idx` not named in `keep`. */
static void sb_keep_only(lua_State *L, int idx, const char *const *keep) {
  if (!lua_istable(L, idx)) return;
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    int k, kept = 0;
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TSTRING) {
      const char *name = lua_tostring(L, -1);
      for (k = 0; keep[k] != NULL; k++)
        if (strcmp(keep[k], name) == 0) kept = 1;
    }
    if (!kept) {
      /* Clearing an existing field during traversal is allowed. */
      lua_pushvalue(L, -1);
      lua_pushnil(L);
      lua_rawset(L, idx);
    }
  }
}

static void sb_strip_global(lua_State *L, const char *name, const char *const *keep) {
  lua_getglobal(L, name);
  sb_keep_only(L, lua_gettop(L), keep);
  lua_pop(L, 1);
}

/* load and loadstring with text only: no bytecode reaches the VM.
 * Upvalue 1 is the original load. */
static int sb_load_text(lua_State *L) {
  lua_settop(L, 2);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_pushliteral(L, "t");
  lua_call(L, 3, LUA_MULTRET);
  return lua_gettop(L);
}

/* package.loaders[2] in the strict profile: a Lua module found on
 * package.path, loaded as text only (the stock loader takes bytecode too,
 * from any file the job points package.path at). Upvalue 1 is the package
 * table, upvalue 2 package.searchpath. Errors read as the stock loader's. */
static int sb_loader_text(lua_State *L) {
  const char *name = luaL_checkstring(L, 1), *file;
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_pushvalue(L, 1);
  lua_getfield(L, lua_upvalueindex(1), "path");
  if (!lua_isstring(L, -1)) return luaL_error(L, LUA_QL("package.path") " must be a string");
  lua_call(L, 2, 2);
  file = lua_tostring(L, 2);
  /* Not found: the message of where it looked. */
  if (file == NULL) return 1;
  if (luaL_loadfilex(L, file, "t") != 0)
    return luaL_error(L, "error loading module " LUA_QS " from file " LUA_QS ":\n\t%s", name,
                      file, lua_tostring(L, -1));
  return 1;
}

/* A cdata literal (1LL, 2ULL, 3i) in text a job loads, or in the bytecode of
 * its closure, makes LuaJIT load the FFI on demand, and loading it puts the
 * module in package.loaded. Loaded here, once, its C type state exists and
 * nothing loads it again; the module itself is then dropped with its name.
 * A LuaJIT built without the FFI has no cdata literals. */
static void sb_load_ffi_types(lua_State *L) {
  lua_CFunction open_ffi;
  *(void **)&open_ffi = dlsym(RTLD_DEFAULT, "luaopen_ffi");
  if (open_ffi == NULL) return;
  lua_pushcfunction(L, open_ffi);
  lua_call(L, 0, 0);
}

void hd_sandbox_lua(lua_State *L) {
  static const char *const keep_io[] = {"write", NULL};
  static const char *const keep_os[] = {"clock", "date", "time", "difftime", "getenv", NULL};
  static const char *const keep_debug[] = {"traceback", NULL};
  static const char *const drop_g[] = {"loadfile", "dofile", "jit", NULL};
  /* string.buffer's reserve and ref hand out pointers as cdata (the FFI's
   * C types exist, see sb_load_ffi_types); thread.exdata stores one. */
  static const char *const drop_loaded[] = {"jit",          "jit.opt",       "jit.util",
                                            "jit.profile",  "ffi",           "string.buffer",
                                            "thread.exdata", "thread.exdata2", NULL};
  int k;
  sb_load_ffi_types(L);
  sb_strip_global(L, "io", keep_io);
  sb_strip_global(L, "os", keep_os);
  sb_strip_global(L, "debug", keep_debug);
  for (k = 0; drop_g[k] != NULL; k++) {
    lua_pushnil(L);
    lua_setglobal(L, drop_g[k]);
  }
  lua_getglobal(L, "load");
  lua_pushcclosure(L, sb_load_text, 1);
  lua_pushvalue(L, -1);
  lua_setglobal(L, "load");
  lua_setglobal(L, "loadstring");
  lua_getglobal(L, "package");
  if (lua_istable(L, -1)) {
    int pkg = lua_gettop(L);
    lua_pushnil(L);
    lua_setfield(L, pkg, "loadlib");
    /* Loaders 3 and 4 load C libraries: gone. 1 (preload) stays, and 2
     * (Lua files on package.path) loads text only. */
    lua_getfield(L, pkg, "loaders");
    if (lua_istable(L, -1)) {
      lua_pushnil(L);
      lua_rawseti(L, -2, 4);
      lua_pushnil(L);
      lua_rawseti(L, -2, 3);
      lua_pushvalue(L, pkg);
      lua_getfield(L, pkg, "searchpath");
      lua_pushcclosure(L, sb_loader_text, 2);
      lua_rawseti(L, -2, 2);
    }
    lua_pop(L, 1);
    lua_getfield(L, pkg, "preload");
    lua_getfield(L, pkg, "loaded");
    for (k = 0; drop_loaded[k] != NULL; k++) {
      lua_pushnil(L);
      lua_setfield(L, -3, drop_loaded[k]);
      lua_pushnil(L);
      lua_setfield(L, -2, drop_loaded[k]);
    }
    lua_pop(L, 2);
  }
  lua_pop(L, 1);
}

/* ---- The process seal ------------------------------------------------------
 * A seccomp filter built as an allow-list: a system call not allowed below
 * kills the process (SIGSYS, which the host reports as SandboxViolation),
 * whatever its number, so calls newer than this libseccomp or this kernel
 * are refused too. Names are resolved on the architecture the worker runs
 * on; a name it lacks (open, poll, stat on arm64) is skipped. SECURITY.md
 * says why each call is here. */

/* Allowed whatever their arguments. */
static const char *const sb_allow[] = {
    /* memory: LuaJIT's allocator and JIT, malloc (mmap is checked below) */
    "brk", "munmap", "mprotect", "mremap", "madvise",
    /* reading files: require, io.read, os.date's time zone (opens are checked below) */
    "read", "readv", "pread64", "close", "fstat", "stat", "lstat", "newfstatat", "statx",
    "getdents64", "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getcwd",
    /* output: print, io.write, the reply */
    "write", "writev",
    /* waiting and time */
    "poll", "ppoll", "futex", "sched_yield", "nanosleep", "clock_nanosleep", "clock_gettime",
    "clock_getres", "gettimeofday", "time", "restart_syscall",
    /* its own signal handling (sending is checked below) */
    "rt_sigreturn", "rt_sigprocmask", "rt_sigaction", "sigaltstack", "setitimer",
    /* who and where it is */
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "uname", "sysinfo",
    "getrusage", "times", "getrlimit", "getrandom",
    /* the end */
    "exit", "exit_group", NULL};

/* Allowed with their arguments checked: sb_add_checked. */
static const char *const sb_checked[] = {
    "mmap", "open", "openat", "fcntl", "ioctl", "lseek", "prlimit64", "setrlimit", "kill",
    "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sched_getaffinity", "vmsplice",
    NULL};

/* The descriptor limit in the sandbox: descriptors are below it. */
#define SB_NOFILE 16

/* Open flags that write or create. O_TMPFILE is O_DIRECTORY and a bit of
 * its own; only that bit is refused, O_DIRECTORY (opendir) is not. */
#define SB_OPEN_WRITE \
  (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND | (O_TMPFILE & ~O_DIRECTORY))

/* Adds a rule for the call `name` with n argument checks, all of which must
 * hold. A name this architecture lacks adds nothing. */
static int sb_rule(scmp_filter_ctx ctx, uint32_t action, const char *name, unsigned n,
                   const struct scmp_arg_cmp *cmp) {
  int nr = seccomp_syscall_resolve_name(name);
  if (nr < 0) return 0;
  return seccomp_rule_add_array(ctx, action, nr, n, cmp) == 0 ? 0 : -1;
}

/* Allows `name` when argument `arg` equals one of the n values. */
static int sb_allow_values(scmp_filter_ctx ctx, const char *name, unsigned arg,
                           const scmp_datum_t *v, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) {
    struct scmp_arg_cmp c = {arg, SCMP_CMP_EQ, v[i], 0};
    if (sb_rule(ctx, SCMP_ACT_ALLOW, name, 1, &c) != 0) return -1;
  }
  return 0;
}

/* The calls of sb_checked. Every comparison is of the whole 64-bit argument
 * against an exact value or under a mask, so an argument with junk in its
 * upper half (the kernel would read only the lower) matches no allowing
 * rule and kills. */
static int sb_add_checked(scmp_filter_ctx ctx, pid_t me) {
  /* Private mappings only: shared memory escapes RLIMIT_DATA, and
   * MAP_SHARED_VALIDATE has the MAP_SHARED bit too. */
  const struct scmp_arg_cmp mmap_private = {3, SCMP_CMP_MASKED_EQ, MAP_SHARED, 0};
  /* Files open read-only: modules on package.path still load. */
  const struct scmp_arg_cmp open_ro = {1, SCMP_CMP_MASKED_EQ, SB_OPEN_WRITE, 0};
  const struct scmp_arg_cmp openat_ro = {2, SCMP_CMP_MASKED_EQ, SB_OPEN_WRITE, 0};
  /* Descriptor flags of its own, and reading the status flags; not F_SETFL
   * (O_NONBLOCK, O_ASYNC on a description the host shares), F_SETOWN,
   * F_SETSIG, leases, locks, F_DUPFD. */
  const scmp_datum_t fcntl_cmds[] = {F_GETFD, F_SETFD, F_GETFL};
  /* isatty (stdio asks before it buffers), the window size, bytes waiting:
   * reading only; not TIOCSTI, FIONBIO, FIOASYNC or terminal settings. */
  const scmp_datum_t ioctl_reqs[] = {TCGETS, TIOCGWINSZ, FIONREAD};
  /* Seeking its own files only: 0, 1 and 2 share their offset with the
   * host, whose log a seek back would overwrite. */
  scmp_datum_t seek_fds[SB_NOFILE - 3];
  /* Limits: its own (pid 0), reading any; setting only RLIMIT_DATA and
   * RLIMIT_AS, which the worker sets per job. Raising a hard limit needs a
   * capability the sandbox has dropped. */
  const struct scmp_arg_cmp rl_get[] = {{0, SCMP_CMP_EQ, 0, 0}, {2, SCMP_CMP_EQ, 0, 0}};
  const struct scmp_arg_cmp rl_data[] = {{0, SCMP_CMP_EQ, 0, 0},
                                         {1, SCMP_CMP_EQ, RLIMIT_DATA, 0}};
  const struct scmp_arg_cmp rl_as[] = {{0, SCMP_CMP_EQ, 0, 0}, {1, SCMP_CMP_EQ, RLIMIT_AS, 0}};
  /* Signals to itself only (raise, abort), by its pid as installed. */
  const struct scmp_arg_cmp to_me = {0, SCMP_CMP_EQ, (scmp_datum_t)me, 0};
  static const char *const signalling[] = {"kill", "tkill", "tgkill", "rt_sigqueueinfo",
                                           "rt_tgsigqueueinfo", NULL};
  /* The CPUs it may run on (the worker polls for jobs only when it has
   * more than one): its own (pid 0). */
  const struct scmp_arg_cmp own = {0, SCMP_CMP_EQ, 0, 0};
  /* A big reply goes to the reply pipe by vmsplice: to that pipe only. */
  const struct scmp_arg_cmp reply_fd = {0, SCMP_CMP_EQ, HD_WORKER_FD, 0};
  const scmp_datum_t per_job[] = {RLIMIT_DATA, RLIMIT_AS};
  size_t i;
  for (i = 0; i < sizeof seek_fds / sizeof seek_fds[0]; i++) seek_fds[i] = 3 + i;
  if (sb_rule(ctx, SCMP_ACT_ALLOW, "mmap", 1, &mmap_private) != 0 ||
      sb_rule(ctx, SCMP_ACT_ALLOW, "open", 1, &open_ro) != 0 ||
      sb_rule(ctx, SCMP_ACT_ALLOW, "openat", 1, &openat_ro) != 0 ||
      /* openat2 takes its flags in a struct the filter cannot read: ENOSYS,
       * and the C library falls back to openat, whose flags it can. */
      sb_rule(ctx, SCMP_ACT_ERRNO(ENOSYS), "openat2", 0, NULL) != 0 ||
      sb_allow_values(ctx, "fcntl", 1, fcntl_cmds, sizeof fcntl_cmds / sizeof fcntl_cmds[0]) ||
      sb_allow_values(ctx, "ioctl", 1, ioctl_reqs, sizeof ioctl_reqs / sizeof ioctl_reqs[0]) ||
      sb_allow_values(ctx, "lseek", 0, seek_fds, sizeof seek_fds / sizeof seek_fds[0]) ||
      sb_rule(ctx, SCMP_ACT_ALLOW, "prlimit64", 2, rl_get) != 0 ||
      sb_rule(ctx, SCMP_ACT_ALLOW, "prlimit64", 2, rl_data) != 0 ||
      sb_rule(ctx, SCMP_ACT_ALLOW, "prlimit64", 2, rl_as) != 0 ||
      sb_allow_values(ctx, "setrlimit", 0, per_job, 2) != 0 ||
      sb_rule(ctx, SCMP_ACT_ALLOW, "sched_getaffinity", 1, &own) != 0 ||
      sb_rule(ctx, SCMP_ACT_ALLOW, "vmsplice", 1, &reply_fd) != 0)
    return -1;
  for (i = 0; signalling[i] != NULL; i++)
    if (sb_rule(ctx, SCMP_ACT_ALLOW, signalling[i], 1, &to_me) != 0) return -1;
  return 0;
}

/* Drops every capability (a worker of a host running as root has them
 * all): no raising a hard limit, no reaching past file permissions, no
 * ptrace-level access to the host's /proc entries. */
static int sb_drop_caps(void) {
  struct __user_cap_header_struct h;
  struct __user_cap_data_struct d[_LINUX_CAPABILITY_U32S_3];
  memset(&h, 0, sizeof h);
  memset(d, 0, sizeof d);
  h.version = _LINUX_CAPABILITY_VERSION_3;
  prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
  return syscall(SYS_capset, &h, d) == 0 ? 0 : -1;
}

/* A Landlock domain of its own, where the kernel has Landlock (5.13 on):
 * a process in one may not ptrace-access a process outside it, so the
 * host's /proc/<pid>/mem, environ and the like are closed to the job even
 * when host and worker share a user and no capability tells them apart.
 * Files are not made, removed or opened to write or execute either (the
 * filter refuses those calls already); reading is left alone. Without
 * Landlock the filter stands alone. */
static void sb_landlock(void) {
#ifdef SYS_landlock_create_ruleset
  struct landlock_ruleset_attr attr;
  int fd;
  memset(&attr, 0, sizeof attr);
  /* The rights of Landlock's first version, which every kernel with it
   * knows; none is granted anywhere. */
  attr.handled_access_fs =
      LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_WRITE_FILE |
      LANDLOCK_ACCESS_FS_REMOVE_DIR | LANDLOCK_ACCESS_FS_REMOVE_FILE |
      LANDLOCK_ACCESS_FS_MAKE_CHAR | LANDLOCK_ACCESS_FS_MAKE_DIR | LANDLOCK_ACCESS_FS_MAKE_REG |
      LANDLOCK_ACCESS_FS_MAKE_SOCK | LANDLOCK_ACCESS_FS_MAKE_FIFO |
      LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_MAKE_SYM;
  fd = (int)syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0);
  if (fd < 0) return;
  syscall(SYS_landlock_restrict_self, fd, 0);
  close(fd);
#endif
}

void hd_sandbox_allowlist(FILE *out) {
  const char *const *lists[] = {sb_allow, sb_checked};
  size_t l, i;
  for (l = 0; l < sizeof lists / sizeof lists[0]; l++)
    for (i = 0; lists[l][i] != NULL; i++)
      if (seccomp_syscall_resolve_name(lists[l][i]) >= 0) fprintf(out, "%s\n", lists[l][i]);
}

int hd_sandbox_process(void) {
  scmp_filter_ctx ctx;
  struct rlimit rl;
  pid_t me = getpid();
  size_t i;
  int rc = -1;
  /* Few descriptors (the protocol pipes, stdio, a module file being read),
   * no core files, small files. */
  rl.rlim_cur = rl.rlim_max = SB_NOFILE;
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0) return -1;
  rl.rlim_cur = rl.rlim_max = 0;
  setrlimit(RLIMIT_CORE, &rl);
  rl.rlim_cur = rl.rlim_max = 16u << 20;
  setrlimit(RLIMIT_FSIZE, &rl);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || sb_drop_caps() != 0) return -1;
  sb_landlock();
  ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
  if (ctx == NULL) return -1;
  /* Another architecture's calling convention (int 0x80 on x86-64) kills
   * the process too, not just the thread. */
  if (seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS) != 0) goto out;
  /* A binary tree of the allowed calls rather than a list: every call the
   * worker makes goes through the filter. Older libseccomp lacks it. */
  seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2);
  for (i = 0; sb_allow[i] != NULL; i++)
    if (sb_rule(ctx, SCMP_ACT_ALLOW, sb_allow[i], 0, NULL) != 0) goto out;
  if (sb_add_checked(ctx, me) != 0) goto out;
  rc = seccomp_load(ctx) == 0 ? 0 : -1;
out:
  seccomp_release(ctx);
  return rc;
}

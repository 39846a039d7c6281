/* sandbox.c: the sandbox profile of a worker: a stripped Lua environment,
 * tight limits and a seccomp filter. SECURITY.md says what it covers. */
#include "sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <lua.h>
#include <seccomp.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

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

void hd_sandbox_lua(lua_State *L) {
  static const char *const keep_io[] = {"write", NULL};
  static const char *const keep_os[] = {"clock", "date", "time", "difftime", "getenv", NULL};
  static const char *const keep_debug[] = {"traceback", NULL};
  static const char *const drop_g[] = {"loadfile", "dofile", "jit", NULL};
  static const char *const drop_loaded[] = {"jit", "jit.opt", "jit.util", "jit.profile", "ffi",
                                            NULL};
  int k;
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
    /* Loaders 3 and 4 load C libraries; 1 (preload) and 2 (Lua files on
     * package.path) stay. */
    lua_getfield(L, pkg, "loaders");
    if (lua_istable(L, -1)) {
      lua_pushnil(L);
      lua_rawseti(L, -2, 4);
      lua_pushnil(L);
      lua_rawseti(L, -2, 3);
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

/* System calls a sandboxed job has no business making. Looked up by name,
 * so a name this architecture lacks is skipped. */
static const char *const sb_denied[] = {
    /* processes and programs */
    "fork", "vfork", "clone", "clone3", "execve", "execveat", "ptrace", "process_vm_readv",
    "process_vm_writev", "setsid", "setpgid", "prctl", "tkill", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal",
    /* namespaces, mounts, the kernel */
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "fsopen",
    "fsmount", "open_tree", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "syslog", "acct", "quotactl", "iopl",
    "ioperm", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime", "sethostname",
    "setdomainname", "personality", "uselib", "userfaultfd", "lookup_dcookie",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "mbind", "set_mempolicy",
    "migrate_pages", "move_pages",
    /* io_uring, bpf, perf, keys */
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "keyctl",
    "add_key", "request_key",
    /* the network */
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    /* changing the file system */
    "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir",
    "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "chown", "fchown",
    "lchown", "fchownat", "truncate", "mknod", "mknodat", "creat", "memfd_create",
    /* identities */
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid", "capset", NULL};

/* Adds kill-the-process rules for opening a file with any of the flags that
 * write or create. `arg` is the flags argument's index. */
static int sb_deny_write_open(scmp_filter_ctx ctx, const char *name, unsigned arg) {
  static const int flags[] = {O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND};
  int nr = seccomp_syscall_resolve_name(name);
  size_t i;
  if (nr == __NR_SCMP_ERROR) return 0;
  for (i = 0; i < sizeof flags / sizeof flags[0]; i++) {
    struct scmp_arg_cmp c = {arg, SCMP_CMP_MASKED_EQ, (scmp_datum_t)flags[i],
                             (scmp_datum_t)flags[i]};
    if (seccomp_rule_add_array(ctx, SCMP_ACT_KILL_PROCESS, nr, 1, &c) != 0) return -1;
  }
  return 0;
}

int hd_sandbox_process(void) {
  scmp_filter_ctx ctx;
  struct rlimit rl;
  pid_t me = getpid();
  size_t i;
  int rc = -1;
  /* Few descriptors (the protocol socket, stdio, a module file being read),
   * no core files, small files. */
  rl.rlim_cur = rl.rlim_max = 16;
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0) return -1;
  rl.rlim_cur = rl.rlim_max = 0;
  setrlimit(RLIMIT_CORE, &rl);
  rl.rlim_cur = rl.rlim_max = 16u << 20;
  setrlimit(RLIMIT_FSIZE, &rl);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
  ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (ctx == NULL) return -1;
  for (i = 0; sb_denied[i] != NULL; i++) {
    int nr = seccomp_syscall_resolve_name(sb_denied[i]);
    if (nr == __NR_SCMP_ERROR) continue;
    if (seccomp_rule_add(ctx, SCMP_ACT_KILL_PROCESS, nr, 0) != 0) goto out;
  }
  /* Signals only to itself (raise, abort). */
  if (seccomp_rule_add(ctx, SCMP_ACT_KILL_PROCESS, SCMP_SYS(kill), 1,
                       SCMP_A0(SCMP_CMP_NE, (scmp_datum_t)me)) != 0 ||
      seccomp_rule_add(ctx, SCMP_ACT_KILL_PROCESS, SCMP_SYS(tgkill), 1,
                       SCMP_A0(SCMP_CMP_NE, (scmp_datum_t)me)) != 0)
    goto out;
  /* Files open read-only: modules on package.path can still be required. */
  if (sb_deny_write_open(ctx, "open", 1) != 0 || sb_deny_write_open(ctx, "openat", 2) != 0)
    goto out;
  rc = seccomp_load(ctx) == 0 ? 0 : -1;
out:
  seccomp_release(ctx);
  return rc;
}

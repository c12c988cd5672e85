/*
 * compat/exec.c — the exec family, interposed so that stream mode's write-behind loses nothing:
 * before the image is replaced, every byte the streams queued goes to the kernel
 * (mpr_stream_last_flush), as it would be in the kernel's socket buffer already without the
 * preload.  Then the real call; if it fails, the program goes on with its streams as they were.
 *
 * glibc's exec functions call its internal execve directly, so each is interposed on its own.
 * A vfork() child shares the parent's memory and must not touch the parent's streams: the
 * flush is skipped in any process other than the one the streams belong to.
 */
#include <dlfcn.h>
#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

#include "preload.h"

static void before_exec(void) {
    if (mpr_state > 0 && mpr_streams) mpr_stream_last_flush();
}

#define NEXT(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

int execve(const char *path, char *const argv[], char *const envp[]) {
    before_exec();
    return NEXT(execve)(path, argv, envp);
}

int execv(const char *path, char *const argv[]) {
    before_exec();
    return NEXT(execv)(path, argv);
}

int execvp(const char *file, char *const argv[]) {
    before_exec();
    return NEXT(execvp)(file, argv);
}

int execvpe(const char *file, char *const argv[], char *const envp[]) {
    before_exec();
    return NEXT(execvpe)(file, argv, envp);
}

int fexecve(int fd, char *const argv[], char *const envp[]) {
    before_exec();
    return NEXT(fexecve)(fd, argv, envp);
}

int execveat(int dirfd, const char *path, char *const argv[], char *const envp[], int flags) {
    before_exec();
    return NEXT(execveat)(dirfd, path, argv, envp, flags);
}

/* The list forms: arg0 and the arguments up to the NULL (as glibc's own execl counts them, and
 * on the stack as it keeps them). */
static size_t count_args(va_list *ap) {
    size_t n = 1;
    va_list c;
    va_copy(c, *ap);
    while (va_arg(c, const char *)) n++;
    va_end(c);
    return n;
}

static void fill_args(char **argv, size_t n, const char *arg0, va_list *ap) {
    argv[0] = (char *)arg0;
    for (size_t i = 1; i < n; i++) argv[i] = va_arg(*ap, char *);
    argv[n] = NULL;
}

int execl(const char *path, const char *arg0, ...) {
    va_list ap;
    va_start(ap, arg0);
    size_t n = count_args(&ap);
    char *argv[n + 1];
    fill_args(argv, n, arg0, &ap);
    va_end(ap);
    return execv(path, argv);
}

int execlp(const char *file, const char *arg0, ...) {
    va_list ap;
    va_start(ap, arg0);
    size_t n = count_args(&ap);
    char *argv[n + 1];
    fill_args(argv, n, arg0, &ap);
    va_end(ap);
    return execvp(file, argv);
}

int execle(const char *path, const char *arg0, ...) {
    va_list ap;
    va_start(ap, arg0);
    size_t n = count_args(&ap);
    char *argv[n + 1];
    fill_args(argv, n, arg0, &ap);
    (void)va_arg(ap, char *); /* the NULL that ends the list */
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, argv, envp);
}

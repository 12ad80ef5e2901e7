/**
 * VM configs of a standalone host: a directory of Proxmox-format files `<dir>/<vmid>.conf`, with
 * Proxmox's config lock (`lock: backup`): `setLock` refuses a VM that already holds a lock
 * (`VM is locked (backup)`), `removeLock` checks the lock it removes.
 *
 * Every read-modify-write runs under a short exclusive lock, as `PVE::AbstractConfig::lock_config`
 * does with `flock`: fibers of one store queue on a semaphore, processes (and other stores) on a lock
 * file `<dir>/.lock-<vmid>.conf` created with `O_EXCL` (holder pid inside; a lock file whose process
 * is gone is taken over). The new file is written to a temporary name, synced and renamed over the
 * old one, so readers never see a partial config.
 *
 * @since 0.1.0
 */
import * as FileSystem from "@effect/platform/FileSystem"
import type * as PlatformError from "@effect/platform/Error"
import * as Config from "effect/Config"
import type * as ConfigError from "effect/ConfigError"
import * as Context from "effect/Context"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Ref from "effect/Ref"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import * as Crypto from "node:crypto"
import * as Path from "node:path"
import * as VmConfig from "./VmConfig.js"

// ---------------------------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------------------------

/**
 * No config file for the VM.
 *
 * @since 0.1.0
 * @category errors
 */
export class VmConfigNotFound extends Schema.TaggedError<VmConfigNotFound>("@vzdump/core/VmConfigNotFound")(
  "VmConfigNotFound",
  { vmid: Schema.Number, path: Schema.String }
) {
  override get message(): string {
    return `Configuration file '${this.path}' does not exist`
  }
}

/**
 * A config lock in the way: `Locked` (setting a lock on a locked VM), `NotLocked` / `Mismatch`
 * (removing a lock that is not there or is another one). Messages are Proxmox's.
 *
 * @since 0.1.0
 * @category errors
 */
export class VmLockError extends Schema.TaggedError<VmLockError>("@vzdump/core/VmLockError")("VmLockError", {
  vmid: Schema.Number,
  reason: Schema.Literal("Locked", "NotLocked", "Mismatch"),
  /** The lock the config holds. */
  lock: Schema.optional(Schema.String),
  /** The lock the caller wanted to remove. */
  expected: Schema.optional(Schema.String)
}) {
  override get message(): string {
    switch (this.reason) {
      case "Locked":
        return `VM is locked (${this.lock})`
      case "NotLocked":
        // Proxmox's text, double space included
        return `no lock found trying to remove ${this.expected === undefined ? "any" : `'${this.expected}' `} lock`
      case "Mismatch":
        return `found lock '${this.lock}' trying to remove '${this.expected}' lock`
    }
  }
}

/**
 * File system trouble, or the exclusive config lock not obtained in time.
 *
 * @since 0.1.0
 * @category errors
 */
export class ConfigStoreError extends Schema.TaggedError<ConfigStoreError>("@vzdump/core/ConfigStoreError")(
  "ConfigStoreError",
  { reason: Schema.Literal("Io", "Timeout"), path: Schema.String, detail: Schema.String }
) {
  override get message(): string {
    return this.reason === "Timeout"
      ? `can't lock file '${this.path}' - ${this.detail}`
      : `${this.path}: ${this.detail}`
  }
}

// ---------------------------------------------------------------------------------------------
// service
// ---------------------------------------------------------------------------------------------

/**
 * @since 0.1.0
 * @category models
 */
export interface ConfigStoreService {
  readonly dir: string
  /** `<dir>/<vmid>.conf` */
  readonly configPath: (vmid: number) => string
  /** VMIDs with a config file, ascending. */
  readonly list: Effect.Effect<ReadonlyArray<number>, ConfigStoreError>
  readonly load: (
    vmid: number
  ) => Effect.Effect<VmConfig.VmConfig, VmConfigNotFound | VmConfig.VmConfigParseError | ConfigStoreError>
  /** Writes `lock: <lock>` into the main section; fails with `Locked` if there is a lock already. */
  readonly setLock: (
    vmid: number,
    lock: string
  ) => Effect.Effect<
    VmConfig.VmConfig,
    VmConfigNotFound | VmConfig.VmConfigParseError | VmLockError | ConfigStoreError
  >
  /** Removes the lock line; with `lock`, only that lock. */
  readonly removeLock: (
    vmid: number,
    lock?: string
  ) => Effect.Effect<
    VmConfig.VmConfig,
    VmConfigNotFound | VmConfig.VmConfigParseError | VmLockError | ConfigStoreError
  >
  /** The VM's firewall config (`<firewallDir>/<vmid>.fw`), if there is one. */
  readonly readFirewall: (vmid: number) => Effect.Effect<Option.Option<string>, ConfigStoreError>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class ConfigStore extends Context.Tag("@vzdump/core/ConfigStore")<ConfigStore, ConfigStoreService>() {}

/**
 * @since 0.1.0
 * @category models
 */
export interface ConfigStoreOptions {
  /** Directory with `<vmid>.conf` files. */
  readonly dir: string
  /** Directory with `<vmid>.fw` firewall files; without it no VM has one. */
  readonly firewallDir?: string | undefined
  /** How long to wait for the exclusive config lock (Proxmox: 10 s). */
  readonly lockTimeout?: Duration.DurationInput | undefined
}

const isSystemError = (error: PlatformError.PlatformError, reason: PlatformError.SystemErrorReason): boolean =>
  error._tag === "SystemError" && error.reason === reason

const processAlive = (pid: number): boolean => {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM"
  }
}

/**
 * Builds a store over a directory.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = Effect.fn("ConfigStore.make")(function*(options: ConfigStoreOptions) {
  const fs = yield* FileSystem.FileSystem
  const dir = options.dir
  const lockTimeout = Duration.decode(options.lockTimeout ?? "10 seconds")
  const semaphores = new Map<number, Effect.Semaphore>()

  const configPath = (vmid: number) => Path.join(dir, `${vmid}.conf`)
  const lockPath = (vmid: number) => Path.join(dir, `.lock-${vmid}.conf`)
  const io = (path: string) => (error: PlatformError.PlatformError) =>
    new ConfigStoreError({ reason: "Io", path, detail: error.message })

  const semaphoreFor = (vmid: number): Effect.Semaphore => {
    let semaphore = semaphores.get(vmid)
    if (semaphore === undefined) {
      semaphore = Effect.unsafeMakeSemaphore(1)
      semaphores.set(vmid, semaphore)
    }
    return semaphore
  }

  // Lock file protocol: content `<pid> <token>\n`, created with O_EXCL.
  const readHolder = (path: string) =>
    fs.readFileString(path).pipe(
      Effect.map((text) => {
        const m = /^(\d+) (\S+)\n?$/.exec(text)
        return m === null ? undefined : { pid: Number(m[1]), token: m[2]!, text }
      }),
      Effect.catchAll(() => Effect.succeed(undefined))
    )

  // Takes a lock file over whose holder is gone. Renaming first means only one process removes a
  // given stale file; if it turns out fresh (replaced meanwhile), it is put back with `link`.
  const breakStale = (path: string, stale: string) =>
    Effect.gen(function*() {
      const moved = `${path}.stale.${process.pid}.${Crypto.randomBytes(6).toString("hex")}`
      const renamed = yield* fs.rename(path, moved).pipe(Effect.as(true), Effect.catchAll(() => Effect.succeed(false)))
      if (!renamed) return
      const now = yield* fs.readFileString(moved).pipe(Effect.catchAll(() => Effect.succeed(stale)))
      if (now !== stale) yield* fs.link(moved, path).pipe(Effect.ignore)
      yield* fs.remove(moved).pipe(Effect.ignore)
    })

  const acquireFile = (path: string, held: Ref.Ref<string | undefined>) => {
    const token = Crypto.randomBytes(12).toString("hex")
    const content = `${process.pid} ${token}\n`
    const attempt = Effect.uninterruptible(
      fs.writeFileString(path, content, { flag: "wx", mode: 0o600 }).pipe(
        Effect.zipRight(Ref.set(held, token)),
        Effect.as(true),
        Effect.catchIf((error) => isSystemError(error, "AlreadyExists"), () => Effect.succeed(false)),
        Effect.mapError(io(path))
      )
    )
    const loop: Effect.Effect<void, ConfigStoreError> = Effect.gen(function*() {
      if (yield* attempt) return
      const holder = yield* readHolder(path)
      if (holder !== undefined && holder.pid !== process.pid && !processAlive(holder.pid)) {
        yield* breakStale(path, holder.text)
      } else {
        yield* Effect.sleep("20 millis")
      }
      return yield* loop
    })
    return loop
  }

  const releaseFile = (path: string, token: string) =>
    Effect.flatMap(readHolder(path), (holder) =>
      holder !== undefined && holder.token === token
        ? fs.remove(path).pipe(
          Effect.catchAll((error) => Effect.logWarning(`unable to remove lock file '${path}': ${error.message}`))
        )
        : Effect.logWarning(`lock file '${path}' was taken over while held`))

  /** Runs `body` holding the VM's exclusive config lock. */
  const withConfigLock = <A, E>(vmid: number, body: Effect.Effect<A, E>): Effect.Effect<A, E | ConfigStoreError> =>
    semaphoreFor(vmid).withPermits(1)(Effect.scoped(Effect.gen(function*() {
      const path = lockPath(vmid)
      const held = yield* Ref.make<string | undefined>(undefined)
      yield* Effect.addFinalizer(() =>
        Effect.flatMap(Ref.get(held), (token) => token === undefined ? Effect.void : releaseFile(path, token))
      )
      yield* acquireFile(path, held).pipe(
        Effect.timeoutFail({
          duration: lockTimeout,
          onTimeout: () => new ConfigStoreError({ reason: "Timeout", path, detail: "got timeout" })
        })
      )
      return yield* body
    })))

  const load = (vmid: number) =>
    Effect.gen(function*() {
      const path = configPath(vmid)
      const text = yield* fs.readFileString(path).pipe(
        Effect.catchIf(
          (error) => isSystemError(error, "NotFound"),
          () => Effect.fail(new VmConfigNotFound({ vmid, path }))
        ),
        Effect.mapError((error) => error._tag === "VmConfigNotFound" ? error : io(path)(error))
      )
      return yield* VmConfig.parse(text, { vmid, path })
    })

  const write = (vmid: number, config: VmConfig.VmConfig) =>
    Effect.gen(function*() {
      const path = configPath(vmid)
      const mode = yield* fs.stat(path).pipe(
        Effect.map((info) => info.mode & 0o7777),
        Effect.orElseSucceed(() => 0o640)
      )
      const tmp = `${path}.tmp.${process.pid}.${Crypto.randomBytes(6).toString("hex")}`
      const data = new TextEncoder().encode(VmConfig.serialize(config))
      yield* Effect.scoped(Effect.gen(function*() {
        const file = yield* fs.open(tmp, { flag: "wx", mode })
        yield* file.writeAll(data)
        yield* file.sync
      })).pipe(
        Effect.zipRight(fs.rename(tmp, path)),
        Effect.tapError(() => fs.remove(tmp).pipe(Effect.ignore)),
        Effect.mapError(io(path))
      )
    })

  const setLock = (vmid: number, lock: string) =>
    withConfigLock(
      vmid,
      Effect.gen(function*() {
        const config = yield* load(vmid)
        const existing = VmConfig.main(config).lock
        if (existing !== undefined) return yield* new VmLockError({ vmid, reason: "Locked", lock: existing })
        const updated = yield* VmConfig.setProperty(config, "lock", lock)
        yield* write(vmid, updated)
        return updated
      })
    ).pipe(Effect.withSpan("ConfigStore.setLock", { attributes: { vmid, lock } }))

  const removeLock = (vmid: number, lock?: string) =>
    withConfigLock(
      vmid,
      Effect.gen(function*() {
        const config = yield* load(vmid)
        const existing = VmConfig.main(config).lock
        if (existing === undefined) {
          return yield* new VmLockError({
            vmid,
            reason: "NotLocked",
            ...(lock === undefined ? {} : { expected: lock })
          })
        }
        if (lock !== undefined && existing !== lock) {
          return yield* new VmLockError({ vmid, reason: "Mismatch", lock: existing, expected: lock })
        }
        const updated = yield* VmConfig.deleteProperty(config, "lock")
        yield* write(vmid, updated)
        return updated
      })
    ).pipe(Effect.withSpan("ConfigStore.removeLock", { attributes: { vmid } }))

  const readFirewall = (vmid: number): Effect.Effect<Option.Option<string>, ConfigStoreError> => {
    if (options.firewallDir === undefined) return Effect.succeed(Option.none())
    const path = Path.join(options.firewallDir, `${vmid}.fw`)
    return fs.readFileString(path).pipe(
      Effect.map(Option.some),
      Effect.catchIf((error) => isSystemError(error, "NotFound"), () => Effect.succeed(Option.none())),
      Effect.mapError(io(path))
    )
  }

  const list = fs.readDirectory(dir).pipe(
    Effect.map((names) =>
      names.flatMap((name) => {
        const m = /^([1-9][0-9]{2,8})\.conf$/.exec(name)
        return m === null ? [] : [Number(m[1])]
      }).sort((a, b) => a - b)
    ),
    Effect.mapError(io(dir))
  )

  return ConfigStore.of({ dir, configPath, list, load, setLock, removeLock, readFirewall })
})

/**
 * @since 0.1.0
 * @category layers
 */
export const layer = (options: ConfigStoreOptions): Layer.Layer<ConfigStore, never, FileSystem.FileSystem> =>
  Layer.effect(ConfigStore, make(options))

/**
 * @since 0.1.0
 * @category layers
 */
export const layerConfig = (
  config: Config.Config.Wrap<ConfigStoreOptions>
): Layer.Layer<ConfigStore, ConfigError.ConfigError, FileSystem.FileSystem> =>
  Layer.effect(ConfigStore, Effect.flatMap(Config.unwrap(config), make))

/**
 * Holds `lock: <lock>` (default `backup`) on the VM's config for the scope: set on acquire,
 * removed on release (a failed removal is logged, as vzdump warns).
 *
 * @since 0.1.0
 * @category locking
 */
export const locked = (
  vmid: number,
  lock = "backup"
): Effect.Effect<
  VmConfig.VmConfig,
  VmConfigNotFound | VmConfig.VmConfigParseError | VmLockError | ConfigStoreError,
  ConfigStore | Scope.Scope
> =>
  Effect.flatMap(ConfigStore, (store) =>
    Effect.acquireRelease(store.setLock(vmid, lock), () =>
      store.removeLock(vmid, lock).pipe(
        Effect.asVoid,
        Effect.catchAll((error) => Effect.logWarning(error.message))
      )))

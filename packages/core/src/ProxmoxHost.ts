/**
 * The Proxmox-host profile: the workflow's host services on a Proxmox VE node, through Proxmox's
 * documented command-line tools and files instead of its Perl internals. Every program runs
 * through `HostCommand`; every path sits under `root` (default `/`), so tests can point the profile
 * at a temporary directory.
 *
 * - `ConfigStore`: reads `/etc/pve/qemu-server/<vmid>.conf` and `/etc/pve/firewall/<vmid>.fw`;
 *   locks with `qm set <vmid> --lock <lock>`, unlocks with `qm unlock <vmid>` (after checking which
 *   lock is set).
 * - `Hypervisor`: `qm status <vmid> --verbose`; `qm shutdown <vmid> --skiplock --keepActive
 *   --timeout <s>`; `qm stop|suspend|resume <vmid> --skiplock`; starting paused: `qm set <vmid>
 *   --freeze 1 --skiplock`, `qm start <vmid> --skiplock`, then `freeze` restored (`qm set <vmid>
 *   --delete freeze --skiplock` or `--freeze <old>`); QMP at `/var/run/qemu-server/<vmid>.qmp`
 *   (one short-lived connection per burst of commands, with descriptor passing for `getfd`); the
 *   guest agent at `/var/run/qemu-server/<vmid>.qga`.
 * - `Storage`: `pvesm path <volid>`; `pvesm status --storage <id>` (must be `active`); size and
 *   format from `pvesh get /nodes/<node>/storage/<id>/content/<volid> --output-format json`; plain
 *   paths through `qemu-img info`.
 * - PBS targets: the `pbs:` section of `/etc/pve/storage.cfg` (server, port, datastore, username,
 *   fingerprint, namespace, encryption-key, master-pubkey) and `/etc/pve/priv/storage/<id>.pw`,
 *   `<id>.enc`, `<id>.master.pem`.
 *
 * @since 0.1.0
 */
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as RcMap from "effect/RcMap"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as NodePath from "node:path"
import * as FdQmpTransport from "@vzdump/qmp/FdQmpTransport"
import * as GuestAgent from "@vzdump/qmp/GuestAgent"
import * as NodeQmpTransport from "@vzdump/qmp/NodeQmpTransport"
import * as QmpClient from "@vzdump/qmp/QmpClient"
import { QmpClosedError } from "@vzdump/qmp/QmpError"
import { BackupTarget } from "./BackupTarget.js"
import { ConfigStore, ConfigStoreError, VmConfigNotFound, VmLockError } from "./ConfigStore.js"
import type { ConfigStoreService } from "./ConfigStore.js"
import { HostCommand } from "./HostCommand.js"
import type { CommandError, RunOptions } from "./HostCommand.js"
import { Hypervisor, HypervisorError } from "./Hypervisor.js"
import type { HypervisorService, QemuVersion, VmRunState } from "./Hypervisor.js"
import * as ProxmoxTarget from "./ProxmoxTarget.js"
import { imageInfo, Storage, StorageError, storeIdOf } from "./Storage.js"
import type { StorageService, VolumeInfo } from "./Storage.js"
import * as VmConfig from "./VmConfig.js"

// ---------------------------------------------------------------------------------------------
// options and paths
// ---------------------------------------------------------------------------------------------

/**
 * @since 0.1.0
 * @category models
 */
export interface ProxmoxHostOptions {
  /** Prefix of every Proxmox path (`/etc/pve/…`, `/var/run/qemu-server/…`); default `/`. */
  readonly root?: string | undefined
  /** This node's name, for `pvesh` paths; default the short host name (as Proxmox VE names nodes). */
  readonly node?: string | undefined
  /** How long a QMP connection stays open after its last command; default 200 ms. */
  readonly monitorIdle?: Duration.DurationInput | undefined
  /** Timeout of `qm`/`pvesm`/`pvesh` calls other than `shutdown`; default 5 minutes. */
  readonly commandTimeout?: Duration.DurationInput | undefined
}

/**
 * The files and sockets the profile uses.
 *
 * @since 0.1.0
 * @category models
 */
export interface ProxmoxPaths {
  readonly configDir: string
  readonly firewallDir: string
  readonly runDir: string
  readonly storageConfig: string
  readonly privStorageDir: string
  readonly config: (vmid: number) => string
  readonly firewall: (vmid: number) => string
  readonly qmp: (vmid: number) => string
  readonly qga: (vmid: number) => string
}

/**
 * @since 0.1.0
 * @category utils
 */
export const paths = (options: ProxmoxHostOptions = {}): ProxmoxPaths => {
  const at = (path: string) => NodePath.join(options.root ?? "/", path)
  const configDir = at("etc/pve/qemu-server")
  const firewallDir = at("etc/pve/firewall")
  const runDir = at("var/run/qemu-server")
  return {
    configDir,
    firewallDir,
    runDir,
    storageConfig: at("etc/pve/storage.cfg"),
    privStorageDir: at("etc/pve/priv/storage"),
    config: (vmid) => NodePath.join(configDir, `${vmid}.conf`),
    firewall: (vmid) => NodePath.join(firewallDir, `${vmid}.fw`),
    qmp: (vmid) => NodePath.join(runDir, `${vmid}.qmp`),
    qga: (vmid) => NodePath.join(runDir, `${vmid}.qga`)
  }
}

const nodeName = (options: ProxmoxHostOptions): string => options.node ?? Os.hostname().split(".")[0]!

const runOptions = (options: ProxmoxHostOptions, timeout?: Duration.DurationInput): RunOptions => ({
  timeoutMs: Duration.toMillis(Duration.decode(timeout ?? options.commandTimeout ?? "5 minutes"))
})

/** The message of a failed command, as the tool printed it (its last stderr line), else ours. */
const toolMessage = (error: CommandError): string => {
  const lines = error.stderr.trim().split("\n").filter((line) => line.trim().length > 0)
  return lines.length > 0 && error.reason === "ExitStatus" ? lines[lines.length - 1]!.trim() : error.message
}

// ---------------------------------------------------------------------------------------------
// ConfigStore
// ---------------------------------------------------------------------------------------------

/**
 * VM configs from `/etc/pve/qemu-server`, locked and unlocked through `qm`.
 *
 * @since 0.1.0
 * @category constructors
 */
export const makeConfigStore = (
  options: ProxmoxHostOptions = {}
): Effect.Effect<ConfigStoreService, never, HostCommand> =>
  Effect.map(HostCommand, (command) => {
    const p = paths(options)
    const io = (path: string, detail: string) => new ConfigStoreError({ reason: "Io", path, detail })

    const load = (vmid: number) =>
      Effect.gen(function*() {
        const path = p.config(vmid)
        const text = yield* Effect.tryPromise({
          try: () => Fs.promises.readFile(path, "utf8"),
          catch: (error) =>
            (error as NodeJS.ErrnoException).code === "ENOENT"
              ? new VmConfigNotFound({ vmid, path })
              : io(path, (error as Error).message)
        })
        return yield* VmConfig.parse(text, { vmid, path })
      })

    const qm = (vmid: number, args: ReadonlyArray<string>) =>
      command.run("qm", args, runOptions(options)).pipe(
        Effect.mapError((error) => {
          const message = toolMessage(error)
          const locked = /VM is locked \(([^)]+)\)/.exec(message)
          return locked !== null
            ? new VmLockError({ vmid, reason: "Locked", lock: locked[1]! })
            : io(p.config(vmid), message)
        })
      )

    const setLock = (vmid: number, lock: string) =>
      Effect.gen(function*() {
        yield* load(vmid)
        yield* qm(vmid, ["set", String(vmid), "--lock", lock])
        return yield* load(vmid)
      }).pipe(Effect.withSpan("ProxmoxHost.setLock", { attributes: { vmid, lock } }))

    const removeLock = (vmid: number, lock?: string) =>
      Effect.gen(function*() {
        const existing = VmConfig.main(yield* load(vmid)).lock
        if (existing === undefined) {
          const expected = lock === undefined ? {} : { expected: lock }
          return yield* new VmLockError({ vmid, reason: "NotLocked", ...expected })
        }
        if (lock !== undefined && existing !== lock) {
          return yield* new VmLockError({ vmid, reason: "Mismatch", lock: existing, expected: lock })
        }
        yield* qm(vmid, ["unlock", String(vmid)])
        return yield* load(vmid)
      }).pipe(Effect.withSpan("ProxmoxHost.removeLock", { attributes: { vmid } }))

    const readFirewall = (vmid: number) =>
      Effect.tryPromise({
        try: () => Fs.promises.readFile(p.firewall(vmid), "utf8"),
        catch: (error) => error as NodeJS.ErrnoException
      }).pipe(
        Effect.map(Option.some),
        Effect.catchAll((error) =>
          error.code === "ENOENT"
            ? Effect.succeed(Option.none<string>())
            : Effect.fail(io(p.firewall(vmid), error.message))
        )
      )

    const list = Effect.tryPromise({
      try: () => Fs.promises.readdir(p.configDir),
      catch: (error) => io(p.configDir, (error as Error).message)
    }).pipe(
      Effect.map((names) =>
        names.flatMap((name) => {
          const m = /^([1-9][0-9]{2,8})\.conf$/.exec(name)
          return m === null ? [] : [Number(m[1])]
        }).sort((a, b) => a - b)
      )
    )

    return ConfigStore.of({
      dir: p.configDir,
      configPath: p.config,
      list,
      load,
      setLock,
      removeLock,
      readFirewall
    })
  })

// ---------------------------------------------------------------------------------------------
// Hypervisor
// ---------------------------------------------------------------------------------------------

/**
 * The top-level `key: value` lines of `qm status <vmid> --verbose` (nested values are indented and
 * skipped).
 *
 * @since 0.1.0
 * @category parsing
 */
export const parseQmStatus = (stdout: string): Record<string, string> => {
  const out: Record<string, string> = {}
  for (const line of stdout.split("\n")) {
    const m = /^([A-Za-z0-9_-]+):(?: (.*))?$/.exec(line.replace(/\r$/, ""))
    if (m !== null && m[2] !== undefined) out[m[1]!] = m[2]
  }
  return out
}

const parseVersion = (text: string | undefined): QemuVersion | undefined => {
  const m = /^(\d+)\.(\d+)(?:\.(\d+))?/.exec(text ?? "")
  return m === null ? undefined : { major: Number(m[1]), minor: Number(m[2]), micro: Number(m[3] ?? 0) }
}

/**
 * The hypervisor through `qm`, QMP and the guest agent.
 *
 * Starting paused: neither `qm start` nor the API's `status/start` has a "paused" parameter
 * (vzdump calls `vm_start(…, paused => 1)` internally). The documented equivalent is the VM
 * option `freeze` ("Freeze CPU at startup"), which makes QEMU start in `prelaunch`: it is set for
 * the start and restored right after.
 *
 * @since 0.1.0
 * @category constructors
 */
export const makeHypervisor = (
  options: ProxmoxHostOptions = {}
): Effect.Effect<HypervisorService, never, HostCommand | Scope.Scope> =>
  Effect.gen(function*() {
    const command = yield* HostCommand
    const p = paths(options)
    const fail = (vmid: number, operation: HypervisorError["operation"], detail: string) =>
      new HypervisorError({ vmid, operation, detail })

    const qm = (
      vmid: number,
      operation: HypervisorError["operation"],
      args: ReadonlyArray<string>,
      timeout?: Duration.DurationInput
    ) =>
      command.run("qm", args, runOptions(options, timeout)).pipe(
        Effect.mapError((error) => fail(vmid, operation, toolMessage(error)))
      )

    // QEMU serves one QMP client per socket and `qm` needs it too: connect per burst of commands
    const connections = yield* RcMap.make({
      lookup: (vmid: number) =>
        QmpClient.make({ address: p.qmp(vmid), handshakeTimeout: "10 seconds" }).pipe(
          Effect.provide(FdQmpTransport.layer)
        ),
      idleTimeToLive: options.monitorIdle ?? "200 millis"
    })

    const monitor = (vmid: number) =>
      Effect.gen(function*() {
        const first = yield* Effect.scoped(RcMap.get(connections, vmid)).pipe(
          Effect.mapError((error) => fail(vmid, "monitor", error.message))
        )
        const connected = RcMap.get(connections, vmid).pipe(
          Effect.mapError((error) => new QmpClosedError({ reason: "PeerClosed", detail: error.message }))
        )
        const execute: QmpClient.QmpClientService["execute"] = (name, args, executeOptions) =>
          Effect.scoped(Effect.flatMap(connected, (client) => client.execute(name, args, executeOptions))).pipe(
            Effect.tapError((error) =>
              error._tag === "QmpClosedError" ? RcMap.invalidate(connections, vmid) : Effect.void
            )
          )
        const service: QmpClient.QmpClientService = {
          address: first.address,
          greeting: first.greeting,
          execute,
          // events need a connection held for as long as the subscription lives
          subscribe: Effect.flatMap(Effect.orDie(RcMap.get(connections, vmid)), (client) => client.subscribe),
          closed: Effect.never
        }
        return service
      })

    const status = (vmid: number) =>
      Effect.gen(function*() {
        const out = yield* qm(vmid, "status", ["status", String(vmid), "--verbose"])
        const fields = parseQmStatus(out.stdout)
        if (fields.status === undefined) return yield* fail(vmid, "status", "unexpected output of 'qm status'")
        const running = fields.status === "running"
        const version = parseVersion(fields["running-qemu"])
        return {
          running,
          ...(running && fields.qmpstatus !== undefined ? { qmpStatus: fields.qmpstatus } : {}),
          ...(running && version !== undefined ? { qemuVersion: version } : {})
        } satisfies VmRunState
      })

    const startPaused = (vmid: number, config: VmConfig.VmConfig) =>
      Effect.gen(function*() {
        const previous = VmConfig.get(VmConfig.main(config), "freeze")
        const frozen = previous === "1"
        if (!frozen) yield* qm(vmid, "start", ["set", String(vmid), "--freeze", "1", "--skiplock"])
        const restore = frozen
          ? Effect.void
          : qm(
            vmid,
            "start",
            previous === undefined
              ? ["set", String(vmid), "--delete", "freeze", "--skiplock"]
              : ["set", String(vmid), "--freeze", previous, "--skiplock"]
          )
        yield* qm(vmid, "start", ["start", String(vmid), "--skiplock"]).pipe(
          Effect.tapError(() => Effect.ignore(restore))
        )
        yield* restore
      })

    const service: HypervisorService = {
      status,
      startPaused,
      shutdown: (vmid, timeout) => {
        const seconds = Math.max(1, Math.ceil(Duration.toSeconds(Duration.decode(timeout))))
        return qm(
          vmid,
          "shutdown",
          ["shutdown", String(vmid), "--skiplock", "--keepActive", "--timeout", String(seconds)],
          Duration.seconds(seconds + 60)
        ).pipe(Effect.asVoid)
      },
      stop: (vmid) => qm(vmid, "stop", ["stop", String(vmid), "--skiplock"]).pipe(Effect.asVoid),
      suspend: (vmid) => qm(vmid, "suspend", ["suspend", String(vmid), "--skiplock"]).pipe(Effect.asVoid),
      resume: (vmid) => qm(vmid, "resume", ["resume", String(vmid), "--skiplock"]).pipe(Effect.asVoid),
      monitor,
      guestAgent: (vmid) =>
        GuestAgent.make({ address: p.qga(vmid) }).pipe(
          Effect.provide(NodeQmpTransport.layer),
          Effect.mapError((error) => fail(vmid, "agent", error.message))
        )
    }
    return service
  })

// ---------------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------------

/**
 * The `Status` column of `pvesm status` for each storage listed.
 *
 * @since 0.1.0
 * @category parsing
 */
export const parsePvesmStatus = (stdout: string): Record<string, string> => {
  const out: Record<string, string> = {}
  const lines = stdout.split("\n").map((line) => line.trim()).filter((line) => line.length > 0)
  const header = lines[0]?.split(/\s+/) ?? []
  const nameColumn = header.indexOf("Name")
  const statusColumn = header.indexOf("Status")
  if (nameColumn < 0 || statusColumn < 0) return out
  for (const line of lines.slice(1)) {
    const columns = line.split(/\s+/)
    const name = columns[nameColumn]
    const status = columns[statusColumn]
    if (name !== undefined && status !== undefined) out[name] = status
  }
  return out
}

const VolumeAttributes = Schema.parseJson(Schema.Struct({
  format: Schema.String,
  size: Schema.Number,
  path: Schema.optional(Schema.String)
}))


/**
 * Volumes through `pvesm` and `pvesh`.
 *
 * Proxmox VE has no command that activates a volume (vzdump calls `PVE::Storage::activate_volumes`):
 * `activate` checks with `pvesm status --storage <id>` that each storage is `active`; logical
 * volumes of a stopped VM are activated by `qm start` when QEMU is started for the backup.
 *
 * @since 0.1.0
 * @category constructors
 */
export const makeStorage = (options: ProxmoxHostOptions = {}): Effect.Effect<StorageService, never, HostCommand> =>
  Effect.map(HostCommand, (command) => {
    const run = (volid: string, reason: StorageError["reason"], program: string, args: ReadonlyArray<string>) =>
      command.run(program, args, runOptions(options)).pipe(
        Effect.mapError((error) => new StorageError({ volid, reason, detail: toolMessage(error) }))
      )

    const path = (volid: string, _vmid: number) => {
      if (storeIdOf(volid) === undefined) {
        return volid.startsWith("/")
          ? Effect.succeed(volid)
          : Effect.fail(new StorageError({ volid, reason: "UnknownStorage", detail: "not a path and no storage id" }))
      }
      return run(volid, "Missing", "pvesm", ["path", volid]).pipe(
        Effect.flatMap((out) => {
          const file = out.stdout.trim().split("\n").pop()?.trim() ?? ""
          return file.length > 0
            ? Effect.succeed(file)
            : Effect.fail(new StorageError({ volid, reason: "Missing", detail: "'pvesm path' printed no path" }))
        })
      )
    }

    const activate = (volids: ReadonlyArray<string>, _vmid: number) =>
      Effect.gen(function*() {
        const stores = [...new Set(volids.flatMap((volid) => storeIdOf(volid) ?? []))]
        for (const store of stores) {
          const volid = volids.find((v) => storeIdOf(v) === store)!
          const out = yield* run(volid, "UnknownStorage", "pvesm", ["status", "--storage", store])
          const state = parsePvesmStatus(out.stdout)[store]
          if (state !== "active") {
            return yield* new StorageError({
              volid,
              reason: "UnknownStorage",
              detail: `storage '${store}' is not active (${state ?? "not listed"})`
            })
          }
        }
        for (const volid of volids.filter((v) => storeIdOf(v) === undefined)) {
          yield* Effect.tryPromise({
            try: () => Fs.promises.stat(volid),
            catch: (error) => new StorageError({ volid, reason: "Missing", detail: (error as Error).message })
          })
        }
      })

    const info = (volid: string, vmid: number): Effect.Effect<VolumeInfo, StorageError> =>
      Effect.gen(function*() {
        const file = yield* path(volid, vmid)
        const store = storeIdOf(volid)
        if (store === undefined) {
          return yield* imageInfo(volid, file, (program, args) => run(volid, "Info", program, args))
        }
        const out = yield* run(volid, "Info", "pvesh", [
          "get",
          `/nodes/${nodeName(options)}/storage/${store}/content/${volid}`,
          "--output-format",
          "json"
        ])
        const decoded = yield* Schema.decodeUnknown(VolumeAttributes)(out.stdout).pipe(
          Effect.mapError((error) =>
            new StorageError({
              volid,
              reason: "Info",
              detail: `cannot determine size of volume '${volid}' - ${error.message}`
            })
          )
        )
        return { volid, path: file, format: decoded.format, size: decoded.size }
      })

    return { storeId: storeIdOf, path, activate, info }
  })

// ---------------------------------------------------------------------------------------------
// PBS storages
// ---------------------------------------------------------------------------------------------

/**
 * The storage configuration could not be read or does not describe a usable PBS storage.
 *
 * @since 0.1.0
 * @category errors
 */
export class ProxmoxStorageConfigError extends Schema.TaggedError<ProxmoxStorageConfigError>(
  "@vzdump/core/ProxmoxStorageConfigError"
)("ProxmoxStorageConfigError", { storeId: Schema.String, detail: Schema.String }) {
  override get message(): string {
    return `storage '${this.storeId}': ${this.detail}`
  }
}

/**
 * One section of `/etc/pve/storage.cfg` (`<type>: <id>` followed by indented `key value` lines).
 *
 * @since 0.1.0
 * @category models
 */
export interface StorageSection {
  readonly type: string
  readonly id: string
  readonly properties: Readonly<Record<string, string>>
}

/**
 * Parses `/etc/pve/storage.cfg`.
 *
 * @since 0.1.0
 * @category parsing
 */
export const parseStorageConfig = (text: string): Array<StorageSection> => {
  const sections: Array<{ type: string; id: string; properties: Record<string, string> }> = []
  let current: { type: string; id: string; properties: Record<string, string> } | undefined
  for (const raw of text.split("\n")) {
    const line = raw.replace(/\r$/, "")
    if (line.trim().length === 0 || line.trim().startsWith("#")) continue
    const header = /^(\S+):\s*(\S+)\s*$/.exec(line)
    if (header !== null && !/^\s/.test(line)) {
      current = { type: header[1]!, id: header[2]!, properties: {} }
      sections.push(current)
      continue
    }
    const property = /^\s+(\S+)(?:\s+(.*))?$/.exec(line)
    if (property !== null && current !== undefined) current.properties[property[1]!] = (property[2] ?? "1").trim()
  }
  return sections
}

/**
 * Proxmox's repository string: `<username>@<server>[:<port>]:<datastore>` (port only when it is not
 * 8007, IPv6 addresses in brackets; username default `root@pam`).
 *
 * @since 0.1.0
 * @category utils
 */
export const pbsRepository = (properties: Readonly<Record<string, string>>): string | undefined => {
  const server = properties.server
  const datastore = properties.datastore
  if (server === undefined || datastore === undefined) return undefined
  const host = server.includes(":") && !server.startsWith("[") ? `[${server}]` : server
  const port = properties.port !== undefined && Number(properties.port) !== 8007 ? `:${properties.port}` : ""
  return `${properties.username ?? "root@pam"}@${host}${port}:${datastore}`
}

/**
 * A `pbs` storage of `/etc/pve/storage.cfg` with its secret files in `/etc/pve/priv/storage/`.
 *
 * @since 0.1.0
 * @category constructors
 */
export const readPbsStorage = (
  options: ProxmoxHostOptions,
  storeId: string
): Effect.Effect<ProxmoxTarget.PbsStorage, ProxmoxStorageConfigError> =>
  Effect.gen(function*() {
    const p = paths(options)
    const text = yield* Effect.tryPromise({
      try: () => Fs.promises.readFile(p.storageConfig, "utf8"),
      catch: (error) =>
        new ProxmoxStorageConfigError({
          storeId,
          detail: `unable to read '${p.storageConfig}' - ${(error as Error).message}`
        })
    })
    const section = parseStorageConfig(text).find((s) => s.id === storeId)
    if (section === undefined) {
      return yield* new ProxmoxStorageConfigError({ storeId, detail: "storage does not exist" })
    }
    if (section.type !== "pbs") {
      return yield* new ProxmoxStorageConfigError({
        storeId,
        detail: `not a Proxmox Backup Server storage (type '${section.type}')`
      })
    }
    const repository = pbsRepository(section.properties)
    if (repository === undefined) {
      return yield* new ProxmoxStorageConfigError({ storeId, detail: "'server' and 'datastore' are required" })
    }
    const props = section.properties
    return {
      storeId,
      repository,
      namespace: props.namespace,
      fingerprint: props.fingerprint,
      passwordFile: NodePath.join(p.privStorageDir, `${storeId}.pw`),
      keyFile: NodePath.join(p.privStorageDir, `${storeId}.enc`),
      masterKeyFile: NodePath.join(p.privStorageDir, `${storeId}.master.pem`),
      encryptionKey: props["encryption-key"],
      masterPubkey: props["master-pubkey"] !== undefined
    }
  })

// ---------------------------------------------------------------------------------------------
// layers
// ---------------------------------------------------------------------------------------------

/**
 * The profile's `ConfigStore`, `Storage` and `Hypervisor`. `HostCommand` is left open so callers
 * choose it (`HostCommand.layer` on a node, a recording fake in tests).
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (
  options: ProxmoxHostOptions = {}
): Layer.Layer<ConfigStore | Storage | Hypervisor, never, HostCommand> =>
  Layer.mergeAll(
    Layer.effect(ConfigStore, makeConfigStore(options)),
    Layer.effect(Storage, makeStorage(options)),
    Layer.scoped(Hypervisor, makeHypervisor(options))
  )

/**
 * A PBS target for a storage of this node (`ProxmoxTarget.makePbs` over `readPbsStorage`).
 *
 * @since 0.1.0
 * @category layers
 */
export const layerPbsTarget = (
  options: ProxmoxHostOptions & { readonly storeId: string; readonly tmpDir?: string | undefined }
): Layer.Layer<BackupTarget, ProxmoxStorageConfigError> =>
  Layer.effect(
    BackupTarget,
    Effect.map(readPbsStorage(options, options.storeId), (storage) =>
      ProxmoxTarget.makePbs({ storage, tmpDir: options.tmpDir }))
  )

/**
 * The standalone-host profile: everything the workflow needs on a plain Linux machine with stock
 * QEMU and no Proxmox.
 *
 * - VM configs: a directory of Proxmox-format files `<configDir>/<vmid>.conf` (`ConfigStore`).
 * - Disks: absolute paths, or volume ids of simple directory storages (`Storage.layerDirectories`).
 * - Hypervisor: starts `qemu-system-x86_64` for a documented subset of the config (`machine`,
 *   `memory`, `cores`, `sockets`, disks on `scsiN`/`virtioN`/`sataN`/`ideN`, `agent`, and `args:`
 *   passed through), daemonized, with its QMP socket, guest-agent socket, PID file and serial log in
 *   `<runDir>/<vmid>/`. A VM counts as running while that PID file names a live QEMU process.
 *   CD-ROMs, EFI disks, TPM state, network devices and PCI passthrough are not launched.
 *
 * @since 0.1.0
 */
import * as NodeFileSystem from "@effect/platform-node/NodeFileSystem"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as RcMap from "effect/RcMap"
import * as Schedule from "effect/Schedule"
import type * as Scope from "effect/Scope"
import { accessSync, constants as FsConstants, readFileSync } from "node:fs"
import * as Fs from "node:fs/promises"
import * as GuestAgent from "@vzdump/qmp/GuestAgent"
import * as NodeQmpTransport from "@vzdump/qmp/NodeQmpTransport"
import * as QmpClient from "@vzdump/qmp/QmpClient"
import * as ConfigStore from "./ConfigStore.js"
import * as HostCommand from "./HostCommand.js"
import { Hypervisor, HypervisorError } from "./Hypervisor.js"
import type { HypervisorService, VmRunState } from "./Hypervisor.js"
import * as QemuCommandLine from "./QemuCommandLine.js"
import * as Storage from "./Storage.js"
import * as VmConfig from "./VmConfig.js"

/**
 * @since 0.1.0
 * @category models
 */
export interface StandaloneHostOptions {
  /** Directory of `<vmid>.conf` files. */
  readonly configDir: string
  /** Directory of `<vmid>.fw` firewall files. */
  readonly firewallDir?: string | undefined
  /** Root of the per-VM run directories. Keep it short: Unix socket paths stop at ~107 bytes. */
  readonly runDir: string
  /** Directory storages: storage id → directory. */
  readonly storages?: Readonly<Record<string, string>> | undefined
  /** Default `qemu-system-x86_64`. */
  readonly qemuBinary?: string | undefined
  /** `auto` (default) uses KVM when /dev/kvm is usable, else TCG. */
  readonly accel?: "auto" | "kvm" | "tcg" | undefined
}

const kvmUsable = (): boolean => {
  try {
    accessSync("/dev/kvm", FsConstants.R_OK | FsConstants.W_OK)
    return true
  } catch {
    return false
  }
}

/** The PID in the file, when it names a live QEMU process. */
const livePid = (pidFile: string): number | undefined => {
  let pid: number
  try {
    pid = Number(readFileSync(pidFile, "utf8").trim())
  } catch {
    return undefined
  }
  if (!Number.isInteger(pid) || pid <= 0) return undefined
  try {
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8")
    return cmdline.includes("qemu") ? pid : undefined
  } catch {
    return undefined
  }
}

/**
 * Builds the hypervisor service of the standalone profile.
 *
 * @since 0.1.0
 * @category constructors
 */
export const makeHypervisor = (
  options: StandaloneHostOptions
): Effect.Effect<HypervisorService, never, Scope.Scope | Storage.Storage | HostCommand.HostCommand> =>
  Effect.gen(function*() {
    const storage = yield* Storage.Storage
    const command = yield* HostCommand.HostCommand
    const paths = (vmid: number) => QemuCommandLine.runPaths(`${options.runDir}/${vmid}`)
    // auto: KVM when /dev/kvm is usable, with QEMU falling back to TCG if KVM cannot start
    const accel = options.accel === "kvm" ? "kvm" : options.accel !== "tcg" && kvmUsable() ? "kvm:tcg" : "tcg"
    const fail = (vmid: number, operation: HypervisorError["operation"], detail: string) =>
      new HypervisorError({ vmid, operation, detail })

    const monitors = yield* RcMap.make({
      lookup: (vmid: number) =>
        QmpClient.make({ address: paths(vmid).qmp, handshakeTimeout: "10 seconds" }).pipe(
          Effect.provide(NodeQmpTransport.layer),
          Effect.mapError((error) => fail(vmid, "monitor", error.message))
        ),
      idleTimeToLive: Duration.zero
    })
    // the agent's chardev also serves one client at a time: share one connection per VM as well
    const agents = yield* RcMap.make({
      lookup: (vmid: number) =>
        GuestAgent.make({ address: paths(vmid).qga, syncTimeout: "3 seconds" }).pipe(
          Effect.provide(NodeQmpTransport.layer),
          Effect.mapError((error) => fail(vmid, "agent", error.message))
        ),
      idleTimeToLive: Duration.zero
    })

    const monitor = (vmid: number) =>
      Effect.suspend(() =>
        livePid(paths(vmid).pid) === undefined
          ? Effect.fail(fail(vmid, "monitor", "VM is not running"))
          : RcMap.get(monitors, vmid)
      )

    const withMonitor = <A, E>(
      vmid: number,
      operation: HypervisorError["operation"],
      use: (qmp: QmpClient.QmpClientService) => Effect.Effect<A, E>
    ) =>
      Effect.scoped(Effect.flatMap(monitor(vmid), (qmp) =>
        use(qmp).pipe(
          Effect.mapError((error) => fail(vmid, operation, (error as { message?: string }).message ?? String(error)))
        )))

    /**
     * Waits until the QEMU process is gone; `false` when it still runs after `timeout`. The polling is
     * interruptible so the timeout also works where the caller is not (finalizers).
     */
    const awaitExit = (vmid: number, timeout: Duration.DurationInput) =>
      Effect.suspend(() => Effect.succeed(livePid(paths(vmid).pid))).pipe(
        Effect.repeat({ schedule: Schedule.spaced("100 millis"), while: (pid) => pid !== undefined }),
        Effect.as(true),
        Effect.interruptible,
        Effect.timeoutTo({ duration: timeout, onTimeout: () => false, onSuccess: (done) => done })
      )

    const launchSpec = (vmid: number, config: VmConfig.VmConfig) =>
      Effect.gen(function*() {
        const main = VmConfig.main(config)
        const disks: Array<QemuCommandLine.LaunchDisk> = []
        for (const drive of main.drives) {
          if (drive.isCdrom || drive.file === "none" || !QemuCommandLine.isLaunchable(drive.key)) continue
          const path = yield* storage.path(drive.file, vmid)
          const format = drive.format ?? (yield* storage.info(drive.file, vmid)).format
          const iothread = drive.options.some(([key, value]) => key === "iothread" && value === "1")
          disks.push({ virtdev: drive.key, path, format, iothread })
        }
        const args = VmConfig.get(main, "args")
        const machine = main.machine?.replace(/\+pve\d+$/, "")
        return {
          vmid,
          ...(main.guestName !== undefined ? { name: main.guestName } : {}),
          ...(machine !== undefined ? { machine } : {}),
          ...(main.memory !== undefined ? { memory: main.memory } : {}),
          ...(main.cores !== undefined ? { cores: main.cores } : {}),
          ...(main.sockets !== undefined ? { sockets: main.sockets } : {}),
          disks,
          agent: main.agent?.enabled === true,
          ...(args !== undefined ? { extraArgs: QemuCommandLine.splitArgs(args) } : {}),
          accel
        } satisfies QemuCommandLine.LaunchSpec
      }).pipe(Effect.mapError((error) => fail(vmid, "start", error.message)))

    const service: HypervisorService = {
      status: (vmid) =>
        Effect.suspend((): Effect.Effect<VmRunState, HypervisorError> => {
          if (livePid(paths(vmid).pid) === undefined) return Effect.succeed({ running: false })
          return withMonitor(vmid, "status", (qmp) =>
            Effect.map(QmpClient.queryStatus().pipe(Effect.provideService(QmpClient.QmpClient, qmp)), (status) => ({
              running: true,
              qmpStatus: status.status,
              qemuVersion: qmp.greeting.QMP.version.qemu
            })))
        }),
      startPaused: (vmid, config) =>
        Effect.gen(function*() {
          const run = paths(vmid)
          if (livePid(run.pid) !== undefined) return yield* Effect.fail(fail(vmid, "start", "VM is already running"))
          const spec = yield* launchSpec(vmid, config)
          yield* Effect.tryPromise({
            try: async () => {
              await Fs.mkdir(run.dir, { recursive: true, mode: 0o700 })
              await Promise.all([run.qmp, run.qga, run.pid].map((file) => Fs.rm(file, { force: true })))
            },
            catch: (cause) => fail(vmid, "start", `run directory ${run.dir}: ${(cause as Error).message}`)
          })
          yield* command.run(
            options.qemuBinary ?? "qemu-system-x86_64",
            QemuCommandLine.commandLine(spec, run, { paused: true }),
            { timeoutMs: 60_000 }
          ).pipe(Effect.mapError((error) => fail(vmid, "start", error.message)))
        }),
      shutdown: (vmid, timeout) =>
        Effect.gen(function*() {
          yield* withMonitor(vmid, "shutdown", (qmp) => qmp.execute("system_powerdown"))
          const exited = yield* awaitExit(vmid, timeout)
          if (!exited) {
            return yield* Effect.fail(
              fail(vmid, "shutdown", `got timeout after ${Duration.format(Duration.decode(timeout))}`)
            )
          }
        }),
      stop: (vmid) =>
        Effect.gen(function*() {
          const pid = livePid(paths(vmid).pid)
          if (pid === undefined) return
          yield* withMonitor(vmid, "stop", (qmp) => qmp.execute("quit")).pipe(Effect.ignore)
          if (yield* awaitExit(vmid, "10 seconds")) return
          yield* Effect.sync(() => process.kill(pid, "SIGKILL")).pipe(Effect.ignore)
          if (!(yield* awaitExit(vmid, "5 seconds"))) {
            return yield* Effect.fail(fail(vmid, "stop", `QEMU process ${pid} does not exit`))
          }
        }),
      suspend: (vmid) => withMonitor(vmid, "suspend", (qmp) => qmp.execute("stop")).pipe(Effect.asVoid),
      resume: (vmid) => withMonitor(vmid, "resume", (qmp) => qmp.execute("cont")).pipe(Effect.asVoid),
      monitor,
      guestAgent: (vmid) =>
        Effect.suspend(() =>
          livePid(paths(vmid).pid) === undefined
            ? Effect.fail(fail(vmid, "agent", "VM is not running"))
            : RcMap.get(agents, vmid)
        )
    }
    return service
  })

/**
 * The whole standalone profile: `ConfigStore`, `Storage`, `Hypervisor` and `HostCommand`.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (
  options: StandaloneHostOptions
): Layer.Layer<ConfigStore.ConfigStore | Storage.Storage | Hypervisor | HostCommand.HostCommand> => {
  const base = Layer.provideMerge(Storage.layerDirectories({ storages: options.storages ?? {} }), HostCommand.layer)
  return Layer.mergeAll(
    Layer.scoped(Hypervisor, makeHypervisor(options)).pipe(Layer.provideMerge(base)),
    ConfigStore.layer({ dir: options.configDir, firewallDir: options.firewallDir }).pipe(
      Layer.provide(NodeFileSystem.layer)
    )
  )
}

/**
 * The run directory paths of a VM under this profile (sockets, PID file, serial log).
 *
 * @since 0.1.0
 * @category utils
 */
export const vmRunPaths = (options: Pick<StandaloneHostOptions, "runDir">, vmid: number): QemuCommandLine.RunPaths =>
  QemuCommandLine.runPaths(`${options.runDir}/${vmid}`)


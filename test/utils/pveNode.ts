/**
 * AN EMULATED Proxmox VE node for end-to-end tests of the Proxmox-host profile: a `HostCommand`
 * that answers `qm`, `pvesm` and `pvesh` the way their documented commands behave (only the
 * sub-commands the profile uses), over files under a temp `root`, and runs every other program for
 * real (`mkfifo`, `qemu-img`, compressors). `qm start` launches a real QEMU 7.2 (paused when the
 * config says `freeze: 1`) behind the Proxmox-QEMU emulator (`pveQemu.ts`) listening on
 * `<root>/var/run/qemu-server/<vmid>.qmp`; `qm stop` ends both. Every `qm`/`pvesm`/`pvesh` call is
 * recorded. This is not Proxmox; it only stands in for it.
 */
import { Effect, ExecutionStrategy, Exit, Layer, Scope } from "effect"
import * as Fs from "node:fs"
import * as Path from "node:path"
import { CommandError, HostCommand } from "@vzdump/core/HostCommand"
import type { CommandOutput } from "@vzdump/core/HostCommand"
import * as HostCommandModule from "@vzdump/core/HostCommand"
import * as ProxmoxHost from "@vzdump/core/ProxmoxHost"
import * as NodeQmpTransport from "@vzdump/qmp/NodeQmpTransport"
import * as QmpClient from "@vzdump/qmp/QmpClient"
import { diskArgs, exec, makeDisks, spawnQemu, tempDir } from "./pveFixture.js"
import type { PveDisk } from "./pveFixture.js"
import * as PveQemu from "./pveQemu.js"

export interface NodeCall {
  readonly program: string
  readonly args: ReadonlyArray<string>
}

export interface PveNode {
  readonly root: string
  readonly nodeName: string
  readonly paths: ProxmoxHost.ProxmoxPaths
  readonly dumpDir: string
  /** The disks of VM 100 (`local:100/vm-100-disk-0.qcow2`, `local:100/vm-100-disk-1.raw`). */
  readonly disks: ReadonlyArray<PveDisk>
  /** The `HostCommand` of this node. */
  readonly layer: Layer.Layer<HostCommand>
  /** Every `qm`/`pvesm`/`pvesh` call, in order. */
  readonly calls: Array<NodeCall>
  /** The emulator of the running VM, if it runs. */
  readonly emulator: () => PveQemu.PveQemu | undefined
  /** The emulator of the last `qm start` (its recorded commands outlive it). */
  readonly lastEmulator: () => PveQemu.PveQemu | undefined
  /** A fresh copy of the recorded calls as `[program, ...args]`. */
  readonly argv: () => Array<Array<string>>
}

export const VM_CONFIG = "name: pvetest\nmemory: 64\nscsi0: local:100/vm-100-disk-0.qcow2,size=8M\n" +
  "virtio1: local:100/vm-100-disk-1.raw,size=4M\n"

export interface PveNodeOptions {
  readonly support?: PveQemu.PveQemuOptions["support"]
  /** Overrides for programs other than qm/pvesm/pvesh (e.g. a failing `mkfifo`). */
  readonly other?: (program: string, args: ReadonlyArray<string>) => Effect.Effect<CommandOutput, CommandError> | undefined
}

const failure = (program: string, args: ReadonlyArray<string>, stderr: string, exitCode = 255) =>
  Effect.fail(new CommandError({ program, args: [...args], exitCode, signal: null, stderr, reason: "ExitStatus" }))

const ok = (stdout = ""): Effect.Effect<CommandOutput, CommandError> => Effect.succeed({ stdout, stderr: "" })

/** Sets up the node with VM 100 stopped. Everything stops when the scope closes. */
export const makePveNode = (options: PveNodeOptions = {}): Effect.Effect<PveNode, never, Scope.Scope> =>
  Effect.gen(function*() {
    const root = yield* tempDir("vzn-")
    const paths = ProxmoxHost.paths({ root })
    const storageDir = Path.join(root, "var/lib/vz")
    const dumpDir = Path.join(storageDir, "dump")
    const imageDir = Path.join(storageDir, "images/100")
    for (const dir of [paths.configDir, paths.firewallDir, paths.runDir, paths.privStorageDir, dumpDir, imageDir]) {
      Fs.mkdirSync(dir, { recursive: true })
    }
    const made = yield* makeDisks(imageDir)
    const disks = made.map((disk) => {
      const path = Path.join(imageDir, `vm-100-disk-${disk.virtdev === "scsi0" ? 0 : 1}.${disk.format}`)
      Fs.renameSync(disk.path, path)
      return { ...disk, path }
    })
    Fs.writeFileSync(paths.config(100), VM_CONFIG)
    const nodeScope = yield* Effect.scope
    const calls: Array<NodeCall> = []
    const vms = new Map<number, { scope: Scope.CloseableScope; emulator: PveQemu.PveQemu }>()
    let last: PveQemu.PveQemu | undefined

    const volumePath = (volid: string) => {
      const m = /^local:(\d+)\/(.+)$/.exec(volid)
      return m === null ? undefined : Path.join(storageDir, "images", m[1]!, m[2]!)
    }
    const readConfig = (vmid: number) => Fs.readFileSync(paths.config(vmid), "utf8")
    const property = (text: string, key: string) => new RegExp(`^${key}: (.*)$`, "m").exec(text)?.[1]
    const setProperty = (vmid: number, key: string, value: string | undefined) => {
      const text = readConfig(vmid).replace(new RegExp(`^${key}: .*\\n`, "m"), "")
      Fs.writeFileSync(paths.config(vmid), value === undefined ? text : `${text}${key}: ${value}\n`)
    }

    const qmpOf = (vmid: number) =>
      QmpClient.make({ address: paths.qmp(vmid), handshakeTimeout: "10 seconds" }).pipe(
        Effect.provide(NodeQmpTransport.layer),
        Effect.orDie
      )

    const start = (vmid: number) =>
      Effect.gen(function*() {
        const text = readConfig(vmid)
        const vmDisks: Array<PveDisk> = []
        for (const line of text.split("\n")) {
          const m = /^((?:scsi|virtio)\d+): ([^,]+)/.exec(line)
          if (m === null) continue
          const path = volumePath(m[2]!)!
          const format = path.endsWith(".qcow2") ? "qcow2" : "raw"
          vmDisks.push({
            virtdev: m[1]!,
            qmdevice: `drive-${m[1]}`,
            path,
            format,
            size: Fs.statSync(path).size,
            hmp: m[1]!
          })
        }
        const scope = yield* Scope.fork(nodeScope, ExecutionStrategy.sequential)
        const backend = Path.join(root, `qemu-${vmid}.sock`)
        const emulator = yield* Effect.gen(function*() {
          yield* spawnQemu([
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            ...(property(text, "freeze") === "1" ? ["-S"] : []),
            "-m",
            property(text, "memory") ?? "64",
            "-qmp",
            `unix:${backend},server=on,wait=off`,
            ...diskArgs(vmDisks)
          ], backend)
          const workDir = Path.join(root, `w${vmid}`)
          Fs.mkdirSync(workDir, { recursive: true })
          return yield* PveQemu.make({
            backend,
            path: paths.qmp(vmid),
            workDir,
            support: options.support,
            vmid
          })
        }).pipe(Scope.extend(scope))
        vms.set(vmid, { scope, emulator })
        last = emulator
      })

    const stop = (vmid: number) =>
      Effect.suspend(() => {
        const vm = vms.get(vmid)
        if (vm === undefined) return Effect.void
        vms.delete(vmid)
        return Scope.close(vm.scope, Exit.void)
      })

    const qmCommand = (args: ReadonlyArray<string>): Effect.Effect<CommandOutput, CommandError> =>
      Effect.gen(function*() {
        const [sub, id, ...rest] = args
        const vmid = Number(id)
        if (!Fs.existsSync(paths.config(vmid))) {
          return yield* failure("qm", args, `Configuration file 'nodes/pve1/qemu-server/${vmid}.conf' does not exist\n`, 2)
        }
        const skiplock = rest.includes("--skiplock")
        const lock = property(readConfig(vmid), "lock")
        const checkLock = () =>
          lock !== undefined && !skiplock ? failure("qm", args, `VM is locked (${lock})\n`) : Effect.void
        const running = vms.has(vmid)
        switch (sub) {
          case "set": {
            yield* checkLock()
            for (let i = 0; i < rest.length; i++) {
              const option = rest[i]!
              if (option === "--skiplock") continue
              if (option === "--delete") {
                setProperty(vmid, rest[++i]!, undefined)
              } else if (option.startsWith("--")) {
                setProperty(vmid, option.slice(2), rest[++i]!)
              }
            }
            return yield* ok()
          }
          case "unlock":
            setProperty(vmid, "lock", undefined)
            return yield* ok()
          case "status": {
            if (!running) return yield* ok(`name: pvetest\nstatus: stopped\nvmid: ${vmid}\n`)
            const status = (yield* Effect.scoped(
              Effect.flatMap(qmpOf(vmid), (qmp) => Effect.orDie(qmp.execute("query-status")))
            )) as { status: string }
            return yield* ok(
              `cpus: 1\nha:\n\tmanaged: 0\nname: pvetest\nqmpstatus: ${status.status}\n` +
                `running-machine: pc-q35-7.2+pve0\nrunning-qemu: 7.2.0\nstatus: running\nvmid: ${vmid}\n`
            )
          }
          case "start":
            yield* checkLock()
            if (running) return yield* failure("qm", args, `VM ${vmid} already running\n`)
            yield* start(vmid)
            return yield* ok()
          case "stop":
            yield* checkLock()
            yield* stop(vmid)
            return yield* ok()
          case "suspend":
          case "resume": {
            yield* checkLock()
            if (!running) return yield* failure("qm", args, `VM ${vmid} not running\n`)
            yield* Effect.scoped(
              Effect.flatMap(qmpOf(vmid), (qmp) => Effect.orDie(qmp.execute(sub === "suspend" ? "stop" : "cont")))
            )
            return yield* ok()
          }
          default:
            return yield* failure("qm", args, `unknown command 'qm ${sub}'\n`)
        }
      })

    const pvesm = (args: ReadonlyArray<string>): Effect.Effect<CommandOutput, CommandError> => {
      if (args[0] === "status" && args[1] === "--storage") {
        if (args[2] !== "local") return failure("pvesm", args, `storage '${args[2]}' does not exist\n`)
        return ok(
          "Name             Type     Status           Total            Used       Available        %\n" +
            "local             dir     active        98497780        12345678        81111111   12.53%\n"
        )
      }
      if (args[0] === "path") {
        const path = volumePath(args[1]!)
        return path === undefined ? failure("pvesm", args, `unable to parse volume ID '${args[1]}'\n`) : ok(`${path}\n`)
      }
      return failure("pvesm", args, "unknown command\n")
    }

    const pvesh = (args: ReadonlyArray<string>): Effect.Effect<CommandOutput, CommandError> =>
      Effect.gen(function*() {
        const m = /^\/nodes\/pve1\/storage\/local\/content\/(.+)$/.exec(args[1] ?? "")
        const path = m === null ? undefined : volumePath(m[1]!)
        if (args[0] !== "get" || path === undefined || !Fs.existsSync(path)) {
          return yield* failure("pvesh", args, "no such volume\n")
        }
        const info = JSON.parse(yield* exec("qemu-img", ["info", "-U", "--output=json", path])) as {
          format: string
          "virtual-size": number
        }
        return yield* ok(JSON.stringify({ format: info.format, size: info["virtual-size"], path, used: 0 }))
      })

    const real = yield* HostCommand.pipe(Effect.provide(HostCommandModule.layer))
    const layer = Layer.succeed(HostCommand, {
      run: (program, args, runOptions) => {
        if (program === "qm" || program === "pvesm" || program === "pvesh") {
          return Effect.suspend(() => {
            calls.push({ program, args: [...args] })
            return program === "qm" ? qmCommand(args) : program === "pvesm" ? pvesm(args) : pvesh(args)
          })
        }
        return Effect.suspend(() => options.other?.(program, args) ?? real.run(program, args, runOptions))
      }
    })

    yield* Effect.addFinalizer(() => Effect.forEach([...vms.keys()], stop, { discard: true }))

    return {
      root,
      nodeName: "pve1",
      paths,
      dumpDir,
      disks,
      layer,
      calls,
      emulator: () => vms.get(100)?.emulator,
      lastEmulator: () => last,
      argv: () => calls.map((call) => [call.program, ...call.args])
    }
  })

/**
 * A throw-away standalone host for end-to-end tests: a config directory, disk images written with
 * qemu-io, a short run directory (Unix socket paths stay short), and the layers of the standalone
 * profile + stock engine. Everything lives in one temp directory removed by the scope's finalizer,
 * after any QEMU the test started has been stopped.
 */
import { Effect, Layer } from "effect"
import { execFile } from "node:child_process"
import { createHash } from "node:crypto"
import { createReadStream } from "node:fs"
import * as Fs from "node:fs/promises"
import { promisify } from "node:util"
import * as BackupReporter from "@vzdump/core/BackupReporter"
import * as BackupTarget from "@vzdump/core/BackupTarget"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import * as StandaloneHost from "@vzdump/core/StandaloneHost"
import * as StockEngine from "@vzdump/core/StockEngine"
import * as HostCommand from "@vzdump/core/HostCommand"

export const run = promisify(execFile)

export const sha256File = (path: string): Promise<string> =>
  new Promise((resolve, reject) => {
    const hash = createHash("sha256")
    createReadStream(path).on("data", (chunk) => hash.update(chunk)).on("end", () => resolve(hash.digest("hex"))).on(
      "error",
      reject
    )
  })

export const sha256 = (data: Uint8Array): string => createHash("sha256").update(data).digest("hex")

/** Raw content of an image (qcow2 converted), as bytes. */
export const imageBytes = async (path: string, format: string, dir: string): Promise<Buffer> => {
  if (format === "raw") return Fs.readFile(path)
  const out = `${dir}/convert-${Date.now()}-${Math.random().toString(16).slice(2)}.raw`
  await run("qemu-img", ["convert", "-U", "-f", format, "-O", "raw", path, out])
  const data = await Fs.readFile(out)
  await Fs.rm(out, { force: true })
  return data
}

/** A temp standalone host; `fleeceDir` may point elsewhere (e.g. a tiny filesystem). */
export const makeTestHost = (options: { readonly fleeceDir?: string } = {}) =>
  Effect.gen(function*() {
    const dir = yield* Effect.acquireRelease(
      Effect.promise(() => Fs.mkdtemp("/tmp/vzt-")),
      (dir) => Effect.promise(() => Fs.rm(dir, { recursive: true, force: true }))
    )
    const configDir = `${dir}/conf`
    const runDir = `${dir}/run`
    const fleeceDir = options.fleeceDir ?? `${dir}/fleece`
    yield* Effect.promise(() => Promise.all([configDir, runDir, fleeceDir].map((d) => Fs.mkdir(d, { recursive: true }))))
    const hostOptions = { configDir, runDir, storages: { local: `${dir}/store` }, accel: "tcg" as const }
    const layer = Layer.mergeAll(
      StandaloneHost.layer(hostOptions),
      StockEngine.layer({ fleeceDir, socketDir: runDir }).pipe(Layer.provide(HostCommand.layer))
    )
    return {
      dir,
      configDir,
      runDir,
      fleeceDir,
      layer,
      writeConfig: (vmid: number, text: string) => Effect.promise(() => Fs.writeFile(`${configDir}/${vmid}.conf`, text)),
      qemuIo: (path: string, format: string, commands: ReadonlyArray<string>) =>
        Effect.promise(() => run("qemu-io", ["-f", format, ...commands.flatMap((c) => ["-c", c]), path])).pipe(
          Effect.asVoid
        )
    }
  })

export type TestHost = Effect.Effect.Success<ReturnType<typeof makeTestHost>>

/** Stops the VM when the scope closes, whatever state the test left it in. */
export const stopOnExit = (vmid: number) =>
  Effect.flatMap(Hypervisor, (hypervisor) => Effect.addFinalizer(() => Effect.ignore(hypervisor.stop(vmid))))

export const memoryTarget = BackupTarget.layerMemory
export const silent = BackupReporter.layerSilent

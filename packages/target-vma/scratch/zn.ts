import * as fs from "node:fs"
import { pipeline } from "node:stream/promises"
import { Effect } from "effect"
import { CompressStream } from "zstd-napi"
import * as VmaOutput from "../src/VmaOutput.js"
import * as VmaWriter from "../src/VmaWriter.js"
import * as io from "../src/internal/io.js"

const disk = "/tmp/vmabench/rand1g"
const size = fs.statSync(disk).size
const CHUNK = 4 << 20
const writeAll = (output: VmaOutput.VmaOutput) => Effect.gen(function*() {
  const writer = yield* VmaWriter.make({ output, devices: [{ name: "d", size }] })
  const fd = fs.openSync(disk, "r")
  const ring = Array.from({ length: 4 }, () => Buffer.allocUnsafe(CHUNK))
  for (let off = 0, i = 0; off < size; off += CHUNK, i++) {
    const buf = ring[i % 4]!.subarray(0, Math.min(CHUNK, size - off))
    yield* io.readInto(fd, buf, off, disk)
    yield* writer.writeData(1, off, buf)
  }
  yield* writer.finish
})
const mode = process.argv[2]
const out = `/tmp/vt/zn-${mode}.zst`
fs.rmSync(out, { force: true })
const t0 = Date.now()
if (mode === "napi") {
  const cs = new CompressStream({ compressionLevel: 1, nbWorkers: 2 })
  const done = pipeline(cs, fs.createWriteStream(out))
  await Effect.runPromise(writeAll(VmaOutput.fromWritable(cs)))
  await done
} else {
  await Effect.runPromise(Effect.scoped(Effect.flatMap(VmaOutput.file(out, { compression: { format: "zstd", level: 1, threads: 0 } }), writeAll)))
}
console.log(mode, Date.now() - t0, "ms", fs.statSync(out).size)
fs.rmSync(out, { force: true })

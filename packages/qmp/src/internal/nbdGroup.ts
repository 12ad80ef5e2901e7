/**
 * Several connections to one export used as one: each request goes to the connection with the fewest
 * requests outstanding (sent or queued), so a deep pipeline is spread over the server's
 * per-connection request loops (QEMU's NBD server and nbdkit accept several connections per export;
 * `nbdcopy` uses 4).
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import type { Extent, ReadResult } from "../NbdClient.js"
import type { Connection, Done, Link, Pending } from "./nbdConnection.js"
import type { NbdRequestFailure } from "./nbdErrors.js"

export class ConnectionGroup implements Link {
  readonly size: number
  readonly minBlock: number
  readonly maxRequest: number
  readonly contexts: ReadonlyMap<number, string>
  private turn = 0

  constructor(readonly connections: ReadonlyArray<Connection>) {
    const first = connections[0]
    this.size = first.size
    this.minBlock = first.minBlock
    this.maxRequest = Math.min(...connections.map((c) => c.maxRequest))
    this.contexts = first.contexts
  }

  /** Least loaded connection; ties go round-robin so idle connections all get work. */
  private pick(): Connection {
    const all = this.connections
    const n = all.length
    let best = this.turn
    for (let k = 1; k < n; k++) {
      const i = (this.turn + k) % n
      if (all[i].load < all[best].load) best = i
    }
    this.turn = (best + 1) % n
    return all[best]
  }

  request(command: number, offset: number, length: number, buffer: Buffer | undefined, done: Done): Pending {
    return this.pick().request(command, offset, length, buffer, done)
  }

  readOnce(offset: number, length: number, buffer?: Buffer): Effect.Effect<ReadResult, NbdRequestFailure> {
    return Effect.suspend(() => this.pick().readOnce(offset, length, buffer))
  }

  blockStatusOnce(offset: number, length: number): Effect.Effect<Map<string, Array<Extent>>, NbdRequestFailure> {
    return Effect.suspend(() => this.pick().blockStatusOnce(offset, length))
  }
}

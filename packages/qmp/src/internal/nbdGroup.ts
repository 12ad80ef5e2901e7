/**
 * Several connections to one export used as one: each request goes to the connection with the fewest
 * requests assigned, so a deep pipeline is spread over the server's per-connection request loops
 * (QEMU's NBD server and nbdkit accept several connections per export; `nbdcopy` uses 4).
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import type { Extent, ReadResult } from "../NbdClient.js"
import type { Connection, Link } from "./nbdConnection.js"
import type { NbdRequestFailure } from "./nbdErrors.js"

export class ConnectionGroup implements Link {
  readonly size: number
  readonly minBlock: number
  readonly maxRequest: number
  readonly contexts: ReadonlyMap<number, string>
  /** Requests assigned to each connection and not finished (queued for a permit or sent). */
  private readonly load: Array<number>
  private turn = 0

  constructor(readonly connections: ReadonlyArray<Connection>) {
    const first = connections[0]
    this.size = first.size
    this.minBlock = first.minBlock
    this.maxRequest = first.maxRequest
    this.contexts = first.contexts
    this.load = connections.map(() => 0)
  }

  /** Least loaded connection; ties go round-robin so idle connections all get work. */
  private pick(): number {
    const n = this.load.length
    let best = this.turn
    for (let k = 1; k < n; k++) {
      const i = (this.turn + k) % n
      if (this.load[i] < this.load[best]) best = i
    }
    this.turn = (best + 1) % n
    return best
  }

  private assign<A>(
    run: (conn: Connection) => Effect.Effect<A, NbdRequestFailure>
  ): Effect.Effect<A, NbdRequestFailure> {
    return Effect.suspend(() => {
      const i = this.pick()
      this.load[i]++
      return Effect.ensuring(
        run(this.connections[i]),
        Effect.sync(() => {
          this.load[i]--
        })
      )
    })
  }

  readOnce(offset: number, length: number, buffer?: Buffer): Effect.Effect<ReadResult, NbdRequestFailure> {
    return this.assign((conn) => conn.readOnce(offset, length, buffer))
  }

  blockStatusOnce(offset: number, length: number): Effect.Effect<Map<string, Array<Extent>>, NbdRequestFailure> {
    return this.assign((conn) => conn.blockStatusOnce(offset, length))
  }
}

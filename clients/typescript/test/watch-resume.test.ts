/**
 * A watch outlives a daemon restart: it resumes from its last seq, and what it
 * delivers is exactly the stored event log, no gap and no duplicate.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { EventType, type Client, type TaskEvent } from "@legato/client";

import { GUARD_MS, signalled, startLegato, withGuard } from "./support/legato.js";

test("a watch resumes across a daemon restart with no gap and no duplicate", async (t) => {
  const legato = await startLegato(t);
  const coder = await legato.agent("coder");
  const researcher = await legato.agent("researcher");
  const cursor = await coder.client.getCursor();

  const received: TaskEvent[] = [];
  const completions: Array<{ promise: Promise<void>; resolve: () => void }> = [signalled(), signalled()];
  const watching = (async () => {
    for await (const event of coder.client.watch({ labels: ["@researcher"], afterSeq: cursor })) {
      received.push(event);
      if (event.type === EventType.COMPLETED) {
        completions.shift()?.resolve();
        if (completions.length === 0) return;
      }
    }
  })();
  const [beforeRestart, afterRestart] = [completions[0]!.promise, completions[1]!.promise];

  const first = await delegateAndAnswer(coder.client, researcher.client, "before the restart", ["one ", "two"]);
  await withGuard(beforeRestart, "the watcher did not see the first task complete");

  await legato.daemon.restart(); // SIGTERM: the daemon ends the stream (UNAVAILABLE)

  // New connections for the work after the restart; the watcher keeps its own.
  const coderAgain = await legato.connect(coder.apiKey);
  const researcherAgain = await legato.connect(researcher.apiKey);
  const second = await delegateAndAnswer(coderAgain, researcherAgain, "after the restart", ["three ", "four"]);
  await withGuard(afterRestart, "the watcher did not resume after the restart");
  await watching;

  const history = [...(await coderAgain.taskHistory(first)), ...(await coderAgain.taskHistory(second))];
  assert.deepEqual(
    received.map((event) => [event.seq, event.type, event.task.id]),
    history.map((event) => [event.seq, event.type, event.task.id]),
  );
  const seqs = received.map((event) => event.seq);
  assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b));
  assert.deepEqual(
    received.filter((event) => event.output !== null).map((event) => event.output?.text),
    ["one ", "two", "three ", "four"],
  );
});

/** The coder delegates, the researcher claims, writes `chunks` and completes; the task id. */
async function delegateAndAnswer(coder: Client, researcher: Client, content: string, chunks: string[]): Promise<string> {
  const handle = await coder.delegate("@researcher", content);
  const job = await researcher.claim({ labels: ["@researcher"], leaseSeconds: 120, waitSeconds: 5 });
  assert.ok(job !== null && job.id === handle.id);
  for (const chunk of chunks) {
    await job.write(chunk);
  }
  await job.complete({ content });
  assert.deepEqual((await handle.result({ timeoutMs: GUARD_MS })).result, { content });
  return handle.id;
}

/**
 * What the client checks before sending, and how it folds deltas: no daemon
 * needed, so these run first and fast.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { Client, EventType, TaskEvent, TaskStatus, type Task } from "@legato/client";

const offline = (): Client => new Client({ address: "unix:/nonexistent/legato.sock", apiKey: "lgt_offline" });

test("a context that is not JSON is refused before anything is sent, naming where", async () => {
  const client = offline();
  try {
    const refused: Array<[unknown, RegExp]> = [
      [{ rate: Number.NaN }, /context\.rate is NaN/],
      [{ nested: { list: [1, undefined] } }, /context\.nested\.list\[1\] is undefined/],
      [{ seen: new Map() }, /context\.seen is a Map/],
      [{ big: 10n }, /context\.big is a bigint/],
      [["not", "an", "object"], /context must be an object of JSON values, not an array/],
    ];
    for (const [context, message] of refused) {
      await assert.rejects(
        // @ts-expect-error: what a caller without types could pass
        client.delegate("@researcher", "anything", { context }),
        (error: unknown) => error instanceof TypeError && message.test(error.message),
      );
    }
  } finally {
    client.close();
  }
});

test("events fold onto the task before them: what an event does not carry keeps its value", () => {
  const created: Task = {
    id: "t_1", content: "summarise the issues", labels: ["@researcher"], context: { repo: "legato" },
    result: null, status: TaskStatus.PENDING, error: "", createdBy: "coder", claimedBy: "", parentId: "",
    rootId: "t_1", attempt: 1, maxAttempts: 3, version: 1, createdAt: new Date(0), updatedAt: new Date(0),
    leaseExpiresAt: null, depth: 0, deadline: null, outputSize: 0, output: "", question: "", answer: "",
    warnings: ["no agent holds @researcher yet"], released: 0,
  };
  const delta = { ...created, content: "", context: {}, status: TaskStatus.DONE, result: { open: 3 }, version: 2, warnings: [] };
  const completed = new TaskEvent({ seq: 2, type: EventType.COMPLETED, task: delta, actor: "researcher", time: new Date(0) });

  const folded = completed.onto(created).task;
  assert.equal(folded.content, "summarise the issues");
  assert.deepEqual(folded.context, { repo: "legato" });
  assert.deepEqual(folded.result, { open: 3 }); // COMPLETED carries the result
  assert.equal(folded.status, TaskStatus.DONE);
  assert.deepEqual(folded.warnings, []); // only the create response has them
  assert.equal(completed.onto(undefined), completed);

  const output = new TaskEvent({
    seq: 3, type: EventType.OUTPUT, task: { ...delta, result: null }, actor: "researcher", time: new Date(0),
    output: { offset: 0, text: "3 open", attempt: 1 },
  });
  assert.deepEqual(output.onto(folded).task.result, { open: 3 }); // OUTPUT does not carry it
});

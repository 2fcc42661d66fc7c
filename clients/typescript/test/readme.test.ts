/**
 * The README's "From TypeScript" examples run as written: each `ts` block is
 * type-checked as strictly as the client itself, compiled, and run as its
 * own process against a real daemon (the worker beside the coders).
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import ts from "typescript";

import { PACKAGE_ROOT, REPO_ROOT, startLegato, withGuard } from "./support/legato.js";

/** The `ts` code blocks of the README section `title`, in order. */
function readmeBlocks(title: string): string[] {
  const readme = readFileSync(join(REPO_ROOT, "README.md"), "utf8");
  const start = readme.indexOf(`\n## ${title}\n`);
  assert.ok(start >= 0, `README.md has no section "${title}"`);
  const end = readme.indexOf("\n## ", start + 1);
  const section = readme.slice(start, end < 0 ? undefined : end);
  return [...section.matchAll(/```ts\n([\s\S]*?)```/g)].map((match) => match[1] ?? "");
}

/** Type-checks `files` with the package's compiler options; the diagnostics, formatted. */
function typeErrors(files: string[]): string {
  const config = ts.getParsedCommandLineOfConfigFile(join(PACKAGE_ROOT, "tsconfig.json"), {}, {
    ...ts.sys,
    onUnRecoverableConfigFileDiagnostic: (diagnostic) => assert.fail(String(diagnostic.messageText)),
  });
  assert.ok(config);
  const program = ts.createProgram(files, { ...config.options, noEmit: true, rootDir: undefined, outDir: undefined });
  const diagnostics = ts.getPreEmitDiagnostics(program);
  return ts.formatDiagnostics(diagnostics, {
    getCanonicalFileName: (name) => name,
    getCurrentDirectory: () => PACKAGE_ROOT,
    getNewLine: () => "\n",
  });
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(file: string, env: Record<string, string>): { done: Promise<Run>; interrupt: () => void } {
  const child = spawn(process.execPath, [file], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (data: Buffer) => (stdout += data.toString()));
  child.stderr.on("data", (data: Buffer) => (stderr += data.toString()));
  const done = once(child, "exit").then(([code]) => ({ code: code as number | null, stdout, stderr }));
  return { done, interrupt: () => child.kill("SIGINT") };
}

async function succeeded(running: Promise<Run>, what: string): Promise<string> {
  const result = await withGuard(running, `${what} did not finish`);
  assert.equal(result.code, 0, `${what} failed:\n${result.stderr}`);
  return result.stdout;
}

test("the README's TypeScript examples type-check and run against a daemon", async (t) => {
  const blocks = readmeBlocks("From TypeScript");
  // Inside the package, so that `@legato/client` resolves to it.
  const dir = join(PACKAGE_ROOT, "build", `readme-${process.pid}`);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  t.after(() => rmSync(dir, { recursive: true, force: true }));

  const files = blocks.map((code, n) => {
    const file = join(dir, `block-${n + 1}.ts`);
    writeFileSync(file, code);
    return file;
  });
  assert.equal(typeErrors(files), "");
  const compiled = files.map((file, n) => {
    const js = ts.transpileModule(blocks[n] ?? "", {
      compilerOptions: { module: ts.ModuleKind.ES2022, target: ts.ScriptTarget.ES2022 },
    }).outputText;
    writeFileSync(file.replace(/\.ts$/, ".js"), js);
    return file.replace(/\.ts$/, ".js");
  });

  const role = (needle: string): string => {
    const index = blocks.findIndex((code) => code.includes(needle));
    assert.ok(index >= 0, `no README block has ${needle}`);
    return compiled[index]!;
  };
  const connecting = role("whoami()");
  const working = role("runWorker(");
  const delegating = role("handle.result(");
  const toolCall = role("delegateToAgent(agent");
  assert.equal(new Set([connecting, working, delegating, toolCall]).size, blocks.length, "a README block is not run");

  const legato = await startLegato(t);
  const coder = await legato.agent("coder");
  const researcher = await legato.agent("researcher");
  const env = {
    LEGATO_ADDRESS: legato.daemon.address,
    LEGATO_AGENT_KEY: coder.apiKey,
    CODER_KEY: coder.apiKey,
    RESEARCHER_KEY: researcher.apiKey,
  };

  assert.match(await succeeded(run(connecting, env).done, "the connect example"), /^connected to unix:.* as coder$/m);

  const worker = run(working, env);
  t.after(() => worker.interrupt());
  // A Struct's keys come back in any order.
  const printsTheResult = (stdout: string): void => {
    assert.match(stdout, /^Looking at the pricing docs\.\.\.$/m);
    assert.match(stdout, /^\{ .*rpm: 500.* \}$/m);
    assert.match(stdout, /^\{ .*source: 'https:\/\/docs\.example\/limits'.* \}$/m);
  };
  printsTheResult(await succeeded(run(delegating, env).done, "the delegation example"));
  printsTheResult(await succeeded(run(toolCall, env).done, "the delegateToAgent example"));

  worker.interrupt(); // Ctrl-C: the worker stops cleanly
  await succeeded(worker.done, "the worker example");
  const tasks = (await coder.client.listTasks()).tasks;
  assert.deepEqual(
    tasks.map((task) => task.status),
    ["done", "done"],
  );
});

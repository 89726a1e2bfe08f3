// Greedy generation with transformers.js from a palikit ONNX export, offline.
//   node tests/js/generate.mjs EXPORT_DIR DTYPE JOBS.json
// JOBS.json: [{"image": "path.png", "prompt": "caption en", "max_new_tokens": 32}, ...]
// Prints one JSON line per job: the processor's input_ids, the generated ids (prompt stripped) and the
// pixel_values' sum, as transformers.js built them.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { AutoProcessor, PaliGemmaForConditionalGeneration, RawImage, env } from '@huggingface/transformers';

const [folder, dtype, jobsFile] = process.argv.slice(2);
if (!folder || !dtype || !jobsFile) {
  console.error('usage: node generate.mjs EXPORT_DIR DTYPE JOBS.json');
  process.exit(2);
}
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder)) + '/';
const id = path.basename(path.resolve(folder));

const model = await PaliGemmaForConditionalGeneration.from_pretrained(id, { dtype, device: 'cpu' });
const processor = await AutoProcessor.from_pretrained(id);
for (const job of JSON.parse(readFileSync(jobsFile, 'utf8'))) {
  const image = await RawImage.read(job.image);
  const inputs = await processor(image, '<image>' + job.prompt);
  const output = await model.generate({ ...inputs, max_new_tokens: job.max_new_tokens, do_sample: false });
  const inputIds = Array.from(inputs.input_ids.data, Number);
  const all = Array.from(output.data, Number);
  const pixels = inputs.pixel_values.data.reduce((a, b) => a + b, 0);
  console.log(JSON.stringify({ prompt: job.prompt, input_ids: inputIds, generated: all.slice(inputIds.length), pixel_sum: pixels }));
}

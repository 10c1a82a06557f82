// tokn$ pages: the savings estimate and the playground's stream. Everything works without
// this script except what must update live.
"use strict";

function usd(micros) {
  return "$" + (micros / 1e6).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 6 });
}

function estimator(root) {
  const slider = root.querySelector("input[type=range]");
  const ratio = Number(root.dataset.ratioPpm) / 1e6;
  const show = () => {
    const spend = Number(slider.value);
    root.querySelector("[data-out=spend]").textContent = "$" + spend.toLocaleString("en-US");
    root.querySelector("[data-out=tokn]").textContent = "$" + Math.round(spend * ratio).toLocaleString("en-US");
    root.querySelector("[data-out=saving]").textContent = "$" + Math.round(spend * (1 - ratio)).toLocaleString("en-US");
  };
  slider.addEventListener("input", show);
  show();
}

async function chat(form) {
  const out = document.getElementById("answer");
  const bill = document.getElementById("bill");
  const button = form.querySelector("button");
  out.textContent = "";
  bill.textContent = "";
  button.disabled = true;
  try {
    const resp = await fetch(form.action, {
      method: "POST",
      headers: { "content-type": "application/json", "x-csrf-token": form.dataset.csrf },
      body: JSON.stringify({ model: form.model.value, prompt: form.prompt.value }),
    });
    if (!resp.ok || !resp.body) {
      const err = await resp.json().catch(() => ({}));
      bill.textContent = (err.error && err.error.message) || ("The gateway answered " + resp.status);
      bill.className = "bad";
      return;
    }
    const reader = resp.body.getReader();
    const text = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += text.decode(value, { stream: true });
      let cut;
      while ((cut = buffered.indexOf("\n\n")) >= 0) {
        const event = buffered.slice(0, cut);
        buffered = buffered.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) { bill.textContent = chunk.error.message; bill.className = "bad"; continue; }
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) out.textContent += choice.delta.content;
          }
          if (chunk.usage && chunk.usage.cost_micros !== undefined) {
            bill.className = "";
            bill.textContent = "Cost " + usd(chunk.usage.cost_micros) + " (list price " +
              usd(chunk.usage.list_cost_micros) + ") · balance left " + usd(chunk.usage.balance_micros);
            const balance = document.getElementById("balance");
            if (balance) balance.textContent = usd(chunk.usage.balance_micros);
          }
        }
      }
    }
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const root of document.querySelectorAll("[data-estimator]")) estimator(root);
  const playground = document.getElementById("playground");
  if (playground) {
    playground.addEventListener("submit", (e) => { e.preventDefault(); chat(playground); });
  }
});

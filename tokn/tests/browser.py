"""The browser walk of tests/browser.rs: a person signs up by email link, sees the welcome
credit, plays with the mock model (the stream, its bill, the balance dropping by exactly the
cost shown), makes a key and uses it with the official OpenAI SDK; the operator reads the
outbox; a third person signs in with GitHub, the first again with Google (one account per
address). Every step asserts what the person would see; screenshots of each page are saved."""
import os
import re
import sys
import time
import urllib.request

from openai import OpenAI
from playwright.sync_api import expect, sync_playwright

WEB = os.environ["TOKN_WEB"]
GATEWAY = os.environ["TOKN_GATEWAY"]
SHOTS = os.environ["TOKN_SHOTS"]
EMAIL = "ana@example.com"


def step(name):
    print(f"browser: {name}", flush=True)


def shot(page, name):
    page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def dollars(text):
    """'$9.999974' -> micro-USD."""
    whole, _, frac = text.strip().lstrip("$").replace(",", "").partition(".")
    return int(whole) * 1_000_000 + int((frac + "000000")[:6])


def wait_for_gateway():
    """The proxy serves once its first configuration arrived (at most 30 s)."""
    deadline = time.time() + 30
    while True:
        req = urllib.request.Request(f"{GATEWAY}/models",
                                     headers={"Authorization": f"Bearer {os.environ['TOKN_DEMO_KEY']}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit("the gateway did not serve within 30 s")
        time.sleep(0.1)


def newest_link(operator):
    """The newest sign-in link in the operator's outbox."""
    operator.goto(f"{WEB}/operator")
    text = operator.locator("#outbox pre").first.inner_text()
    found = re.search(r"(http://\S+/signin/link\?token=\S+)", text)
    assert found, text
    return found.group(1)


def main():
    wait_for_gateway()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ["TOKN_CHROMIUM"],
                                    args=["--no-sandbox"])
        operator = browser.new_context().new_page()
        person_ctx = browser.new_context(viewport={"width": 1200, "height": 900})
        page = person_ctx.new_page()

        step("the operator signs in with the link tokn printed")
        operator.goto(os.environ["TOKN_OPERATOR_LINK"])
        operator.get_by_role("button", name="Sign in").click()
        expect(operator).to_have_url(f"{WEB}/operator")
        expect(operator.get_by_role("heading", name="Operator")).to_be_visible()

        step("the landing page: pitch, SDK swap, savings estimate from the live ratio")
        page.goto(WEB)
        expect(page.get_by_role("heading", level=1)).to_contain_text("less than list price")
        expect(page.locator("[data-estimator]")).to_have_attribute("data-ratio-ppm", "600000")
        page.locator("#spend").fill("10000")
        expect(page.locator("[data-out=tokn]")).to_have_text("$6,000")
        expect(page.locator("[data-out=saving]")).to_have_text("$4,000")
        shot(page, "landing")

        step("models and prices from the live catalog")
        page.goto(f"{WEB}/models")
        row = page.locator("tr", has=page.locator("code", has_text=re.compile("^mock$")))
        expect(row).to_contain_text("$1.00")   # list input per 1M
        expect(row).to_contain_text("$0.60")   # tokn$ input per 1M: 60% of list
        shot(page, "models")

        step("sign up by email link")
        page.goto(WEB)
        page.get_by_role("link", name="Start with free credit").click()
        page.get_by_label("Email").fill(EMAIL)
        page.get_by_label("New account: I want to").select_option("buyer")
        page.get_by_role("button", name="Email me a sign-in link").click()
        expect(page.get_by_role("heading", name="Check your email")).to_be_visible()
        link = newest_link(operator)
        page.goto(link)
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(f"{WEB}/app")

        step("the welcome credit is in the wallet")
        expect(page.locator("#balance")).to_have_text("$10.00")
        expect(page.locator("text=welcome credit").first).to_be_visible()
        shot(page, "wallet")

        step("the link works once")
        page2 = browser.new_context().new_page()
        page2.goto(link)
        page2.get_by_role("button", name="Sign in").click()
        expect(page2.get_by_role("alert")).to_contain_text("expired or was used")

        step("the playground streams an answer and the balance drops by the cost shown")
        page.get_by_role("link", name="Playground").first.click()
        expect(page.locator("#balance")).to_have_text("$10.00")
        page.get_by_label("Model").select_option("mock")
        page.get_by_label("Message").fill("Say hello")
        page.get_by_role("button", name="Send").click()
        try:
            expect(page.locator("#answer")).to_contain_text("Hello from the tokn$ mock model", timeout=15000)
        except AssertionError:
            print("browser: the playground said:", page.locator("#bill").inner_text(), flush=True)
            raise
        expect(page.locator("#bill")).to_contain_text("balance left", timeout=15000)
        bill = page.locator("#bill").inner_text()
        cost, list_cost, left = [dollars(m) for m in re.findall(r"\$[0-9.,]+", bill)]
        assert 0 < cost < list_cost, bill
        assert left == 10_000_000 - cost, bill
        expect(page.locator("#balance")).to_have_text(re.compile(re.escape(bill.split("balance left ")[1])))
        shot(page, "playground")
        # The ledger says the same once the usage drained (bounded wait).
        deadline = time.time() + 20
        while True:
            page.goto(f"{WEB}/app")
            if dollars(page.locator("#balance").inner_text()) == left:
                break
            assert time.time() < deadline, "the ledger did not reach the playground's balance"
            time.sleep(0.5)

        step("a key, shown once, works with the official OpenAI SDK")
        page.get_by_label("Name").fill("laptop")
        page.get_by_role("button", name="Create key").click()
        secret = page.locator("#secret").inner_text().strip()
        assert secret.startswith("tok_live_"), secret
        shot(page, "new-key")
        client = OpenAI(base_url=GATEWAY, api_key=secret)
        answer = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "Hi"}])
        assert "mock model" in answer.choices[0].message.content
        page.goto(f"{WEB}/app")
        expect(page.locator("table").first).to_contain_text("laptop")
        assert secret not in page.content(), "a key is shown once only"

        step("buy a credit pack through Stripe Checkout (the fake's hosted page)")
        page.goto(f"{WEB}/app")
        before = dollars(page.locator("#balance").inner_text())
        page.get_by_role("button", name="Buy Starter").click()
        expect(page.get_by_role("heading", name="Pay 20.00 USD")).to_be_visible()
        page.get_by_role("button", name="Pay").click()
        expect(page).to_have_url(re.compile(r"/app/purchases\?session=cs_"))
        expect(page.locator("#purchase-status")).to_contain_text("Paid: $20.00")
        shot(page, "purchase")
        page.goto(f"{WEB}/app")
        assert dollars(page.locator("#balance").inner_text()) == before + 20_000_000

        step("the demo key tokn printed works too")
        demo = OpenAI(base_url=GATEWAY, api_key=os.environ["TOKN_DEMO_KEY"])
        assert demo.chat.completions.create(model="mock", messages=[{"role": "user", "content": "Hi"}]).choices

        step("a second person signs up as a seller and connects a credential")
        seller = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
        seller.goto(f"{WEB}/signin")
        seller.get_by_label("Email").fill("sam@example.com")
        seller.get_by_label("New account: I want to").select_option("seller")
        seller.get_by_role("button", name="Email me a sign-in link").click()
        seller.goto(newest_link(operator))
        seller.get_by_role("button", name="Sign in").click()
        expect(seller).to_have_url(f"{WEB}/sell")
        seller.get_by_role("link", name="OpenAI", exact=True).click()
        expect(seller.locator(".notice")).to_contain_text("Least access")
        seller.get_by_label("Your name for it").fill("spare-openai")
        seller.get_by_label("API key").fill("sk-seller-spare-0123456789")
        seller.get_by_label("Base URL").fill(os.environ["TOKN_FAKE_OPENAI"])
        seller.get_by_role("button", name="Connect and verify").click()
        expect(seller).to_have_url(f"{WEB}/sell")
        creds = seller.locator("#credentials")
        expect(creds).to_contain_text("spare-openai")
        expect(creds).to_contain_text("valid")
        expect(creds).to_contain_text("awaiting the operator's approval")
        assert "sk-seller-spare" not in seller.content(), "the secret is never shown again"

        step("the operator approves the seller's own endpoint")
        operator.goto(f"{WEB}/operator")
        operator.get_by_role("button", name="Approve spare-openai").click()
        expect(operator.locator("#approvals")).to_contain_text("None.")
        seller.reload()
        expect(seller.locator("#credentials")).to_contain_text("your own, approved")

        step("the seller lists two pools; FIFO puts the first first")
        for face in ["5", "5"]:
            seller.get_by_role("link", name="List credit on spare-openai").click()
            seller.get_by_label("Face value in dollars").fill(face)
            seller.get_by_label("Price, as a percentage of list price").fill("60")
            seller.get_by_role("checkbox", name="gpt-4o-mini").check()
            seller.get_by_role("button", name="List credit").click()
            expect(seller).to_have_url(f"{WEB}/sell")
        rows = seller.locator("#pools tbody tr")
        expect(rows).to_have_count(2)
        first, second = rows.nth(0), rows.nth(1)
        expect(first).to_contain_text("1 of 2 in the queue")
        expect(second).to_contain_text("2 of 2 in the queue")
        expect(first).to_contain_text("60% of list")

        step("the buyer's traffic consumes the first pool, and the seller earns")
        page.goto(f"{WEB}/models")
        expect(page.locator("tr", has=page.locator("code", has_text=re.compile("^gpt-4o-mini$")))).to_contain_text("2")
        buyer = OpenAI(base_url=GATEWAY, api_key=secret)
        for i in range(5):
            r = buyer.chat.completions.create(model="gpt-4o-mini",
                                              messages=[{"role": "user", "content": f"question {i}"}])
            assert r.choices[0].message.content
        deadline = time.time() + 20
        while True:
            seller.reload()
            if dollars(seller.locator("#earned").inner_text()) > 0:
                break
            assert time.time() < deadline, "no earnings appeared"
            time.sleep(0.5)
        first, second = rows.nth(0), rows.nth(1)
        consumed_first = dollars(first.locator("td").nth(3).inner_text())
        consumed_second = dollars(second.locator("td").nth(3).inner_text())
        assert consumed_first > 0 and consumed_second == 0, (consumed_first, consumed_second)
        shot(seller, "seller-pools")

        step("the buyer's usage by day, model and key, drawn from the daily roll-up")
        page.goto(f"{WEB}/app/usage")
        expect(page.locator("#by-model")).to_contain_text("gpt-4o-mini")
        expect(page.locator("#by-model")).to_contain_text("mock")
        expect(page.locator("#by-key")).to_contain_text("laptop")
        expect(page.locator("svg.chart").first).to_be_visible()
        shot(page, "usage")

        step("the operator sees the new account, and runs payouts (nothing is past the hold yet)")
        operator.goto(f"{WEB}/operator")
        expect(operator.get_by_role("table").filter(has_text=EMAIL).first).to_be_visible()
        expect(operator.locator("#payouts")).to_contain_text("None yet.")
        shot(operator, "operator")
        operator.get_by_role("button", name="Run payouts now").click()
        expect(operator.get_by_role("heading", name="Payouts run")).to_be_visible()
        expect(operator.get_by_role("status")).to_contain_text("0 made")

        step("sign in with GitHub (the fake): a new person, with the welcome credit")
        dev = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
        dev.goto(f"{WEB}/signin")
        shot(dev, "signin")
        dev.get_by_label("New account: I want to").select_option("buyer")
        dev.get_by_role("button", name="Continue with GitHub").click()
        expect(dev.get_by_role("heading", name="Sign in to GitHub")).to_be_visible()
        dev.get_by_label("Email").fill("dev@example.com")
        dev.get_by_role("button", name="Authorize tokn$").click()
        expect(dev).to_have_url(f"{WEB}/app")
        expect(dev.locator("#balance")).to_have_text("$10.00")

        step("sign in with Google (the fake) as the first buyer: the same account, no second credit")
        page.goto(f"{WEB}/app")
        balance = page.locator("#balance").inner_text()
        again = browser.new_context().new_page()
        again.goto(f"{WEB}/signin")
        again.get_by_role("button", name="Continue with Google").click()
        expect(again.get_by_role("heading", name="Choose an account")).to_be_visible()
        again.get_by_label("Email").fill(EMAIL.upper())
        again.get_by_role("button", name="Authorize tokn$").click()
        expect(again).to_have_url(f"{WEB}/app")
        expect(again.locator("#balance")).to_have_text(balance)
        expect(again.locator("table").first).to_contain_text("laptop")

        step("sign out everywhere ends the person's other sessions too")
        again.get_by_role("button", name="Sign out everywhere").click()
        page.goto(f"{WEB}/app")
        expect(page).to_have_url(re.compile(r"/signin\?return_to=%2Fapp$"))

        step("sign out ends the session")
        dev.get_by_role("button", name="Sign out", exact=True).click()
        dev.goto(f"{WEB}/app")
        expect(dev).to_have_url(re.compile(r"/signin\?return_to=%2Fapp$"))
        browser.close()
    step("done")


if __name__ == "__main__":
    main()

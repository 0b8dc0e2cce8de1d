"""Granite 4.0 style chat template (Jinja), written into the demo checkpoint's tokenizer_config.json.

Serving code never uses this string directly: it renders with the checkpoint's own template through
`Tokenizer.render_chat`, so a real Granite checkpoint brings its own. This one follows the Granite 4.0
format: `<|start_of_role|>{role}<|end_of_role|>{content}<|end_of_text|>\n` per turn, a default system
prompt when none is given, tools listed in `<tools>` and documents in `<documents>` inside the system
turn, assistant tool calls as `<tool_call>\n{json}\n</tool_call>`, consecutive tool results in one user
turn as `<tool_response>` blocks, generation prompt `<|start_of_role|>assistant<|end_of_role|>`.
"""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Please ensure responses are professional, accurate, and safe."

TOOLS_PREFIX = (
    "You are a helpful assistant with access to the following tools. You may call one or more tools to "
    "assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:"
    "\n<tools>"
)
TOOLS_SUFFIX = (
    "\n</tools>\n\nFor each tool call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>. If a tool does not exist in the provided list of tools, notify the "
    "user that you do not have the ability to fulfill the request."
)
DOCUMENTS_PREFIX = (
    "You are a helpful assistant with access to the following documents. You may use one or more documents "
    "to assist with the user query.\n\nYou are given a list of documents within <documents></documents> XML "
    "tags:\n<documents>"
)
DOCUMENTS_SUFFIX = (
    "\n</documents>\n\nWrite the response to the user's input by strictly aligning with the facts in the "
    "provided documents. If the information needed to answer the question is not available in the "
    "documents, inform the user that the question cannot be answered based on the available data."
)

# Message content may be a string, an OpenAI-style list of parts (only "text" parts are kept), or a
# JSON object (e.g. a tool result), rendered as JSON.
_TEMPLATE = r"""
{%- macro text_of(content) -%}
  {%- if content is none -%}
  {%- elif content is string -%}{{ content }}
  {%- elif content is mapping -%}{{ content | tojson }}
  {%- else -%}
    {%- for part in content if part.type == 'text' -%}{{ ('\n' if not loop.first else '') + part.text }}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if available_tools is defined and available_tools %}{% set tools = available_tools %}{% endif -%}
{%- set ns = namespace(tools='', docs='', system='') -%}
{%- if tools -%}
  {%- set ns.tools = '@@TOOLS_PREFIX@@' -%}
  {%- for tool in tools %}{% set ns.tools = ns.tools + '\n' + (tool | tojson) %}{% endfor -%}
  {%- set ns.tools = ns.tools + '@@TOOLS_SUFFIX@@' -%}
{%- endif -%}
{%- if documents -%}
  {%- set ns.docs = '@@DOCUMENTS_PREFIX@@' -%}
  {%- for doc in documents %}{% set ns.docs = ns.docs + '\n' + (doc | tojson) %}{% endfor -%}
  {%- set ns.docs = ns.docs + '@@DOCUMENTS_SUFFIX@@' -%}
{%- endif -%}
{%- set extras = [ns.tools, ns.docs] | select | join('\n\n') -%}
{%- if messages and messages[0].role == 'system' -%}
  {%- set ns.system = text_of(messages[0].content) -%}
  {%- if extras %}{% set ns.system = ns.system + '\n\n' + extras %}{% endif -%}
  {%- set rest = messages[1:] -%}
{%- else -%}
  {%- set ns.system = extras if extras else '@@DEFAULT_SYSTEM@@' -%}
  {%- set rest = messages -%}
{%- endif -%}
{{- '<|start_of_role|>system<|end_of_role|>' + ns.system + '<|end_of_text|>\n' -}}
{%- for message in rest -%}
  {%- set content = text_of(message.content) -%}
  {%- if message.role == 'tool' -%}
    {%- if loop.first or loop.previtem.role != 'tool' %}{{ '<|start_of_role|>user<|end_of_role|>' }}{% endif -%}
    {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
    {%- if loop.last or loop.nextitem.role != 'tool' %}{{ '<|end_of_text|>\n' }}{% endif -%}
  {%- elif message.role == 'assistant' -%}
    {{- '<|start_of_role|>assistant<|end_of_role|>' + content -}}
    {%- for call in (message.tool_calls or []) -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {%- if content or not loop.first %}{{ '\n' }}{% endif -%}
      {{- '<tool_call>\n{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
      {{- fn.arguments if fn.arguments is string else (fn.arguments | tojson) -}}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|end_of_text|>\n' -}}
  {%- else -%}
    {{- '<|start_of_role|>' + message.role + '<|end_of_role|>' + content + '<|end_of_text|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{% endif -%}
"""


def _jinja_str(text: str) -> str:
    # Embed a Python string inside a single-quoted Jinja string literal.
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


CHAT_TEMPLATE = (
    _TEMPLATE.strip()
    .replace("@@TOOLS_PREFIX@@", _jinja_str(TOOLS_PREFIX))
    .replace("@@TOOLS_SUFFIX@@", _jinja_str(TOOLS_SUFFIX))
    .replace("@@DOCUMENTS_PREFIX@@", _jinja_str(DOCUMENTS_PREFIX))
    .replace("@@DOCUMENTS_SUFFIX@@", _jinja_str(DOCUMENTS_SUFFIX))
    .replace("@@DEFAULT_SYSTEM@@", _jinja_str(DEFAULT_SYSTEM_PROMPT))
)
